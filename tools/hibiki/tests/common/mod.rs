//! What the CLI's tests share.

use tokio::process::Command;

/// Runs `hibiki ARGS` to its end: (success, stdout, stderr).
pub async fn hibiki(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_hibiki"))
        .args(args)
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
