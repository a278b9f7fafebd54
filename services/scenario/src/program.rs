//! A scenario's steps as a flat program a run walks with a counter: a
//! branch becomes a test that jumps over its `then` steps to its `else`
//! steps, and the end of `then` jumps past `else`. A run stores its version
//! and its counter; the same version always compiles to the same program, so
//! a run resumes exactly where it stood, on the version it started with.

use hibiki_proto::scenario::v1::{Condition, QuietHours, ScenarioDefinition, Step, step};

/// One instruction.
#[derive(Debug, Clone)]
pub enum Op {
    /// Run this step (tags, attributes, rich menu, messages, wait, stop).
    Step(Step),
    /// A branch step: when `condition` does not hold, go to `otherwise`.
    Branch {
        step_id: String,
        condition: Condition,
        otherwise: usize,
    },
    /// Continue at this counter (the end of a branch's `then`).
    Jump(usize),
}

/// A compiled scenario version.
#[derive(Debug, Clone)]
pub struct Program {
    pub ops: Vec<Op>,
    /// Sends inside this daily window are held to its end.
    pub quiet_hours: Option<QuietHours>,
}

impl Program {
    /// Whether a run at `pc` has nothing left to do (past the end, perhaps
    /// after jumps).
    pub fn ends_at(&self, mut pc: usize) -> bool {
        // Jumps only go forward, so this ends.
        while let Some(Op::Jump(to)) = self.ops.get(pc) {
            pc = *to;
        }
        pc >= self.ops.len()
    }

    /// The step ids in definition order (a branch before its `then`
    /// steps, those before its `else` steps).
    pub fn step_ids(&self) -> Vec<&str> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Op::Branch { step_id, .. } => Some(step_id.as_str()),
                Op::Step(s) => Some(s.id.as_str()),
                Op::Jump(_) => None,
            })
            .collect()
    }

    /// Compiles a (checked) definition.
    pub fn compile(definition: &ScenarioDefinition) -> Self {
        let mut ops = Vec::new();
        emit(&definition.steps, &mut ops);
        Self {
            ops,
            quiet_hours: definition.options.as_ref().and_then(|o| o.quiet_hours),
        }
    }
}

fn emit(steps: &[Step], ops: &mut Vec<Op>) {
    for s in steps {
        match &s.action {
            Some(step::Action::Branch(b)) => {
                let test = ops.len();
                ops.push(Op::Jump(0)); // placeholder for the branch test
                emit(&b.then, ops);
                let jump = ops.len();
                ops.push(Op::Jump(0)); // placeholder: past `else`
                let otherwise = ops.len();
                emit(&b.otherwise, ops);
                let end = ops.len();
                ops[test] = Op::Branch {
                    step_id: s.id.clone(),
                    condition: b.condition.clone().unwrap_or_default(),
                    otherwise,
                };
                ops[jump] = Op::Jump(end);
            }
            _ => ops.push(Op::Step(s.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::from_yaml;

    #[test]
    fn a_branch_jumps_over_then_to_else_and_then_jumps_past_else() {
        let d = from_yaml(
            "name: t\ntrigger: { follow: {} }\nsteps:\n\
             - { id: a, add_tags: [x] }\n\
             - id: b\n  branch:\n    if: { has_tag: vip }\n    then: [{ id: c, add_tags: [y] }]\n    else: [{ id: d, add_tags: [z] }, { id: e, stop: {} }]\n\
             - { id: f, add_tags: [w] }\n",
        )
        .unwrap();
        let p = Program::compile(&d);
        let shape: Vec<String> = p
            .ops
            .iter()
            .map(|op| match op {
                Op::Step(s) => s.id.clone(),
                Op::Branch {
                    step_id, otherwise, ..
                } => format!("{step_id}?else:{otherwise}"),
                Op::Jump(to) => format!("jump:{to}"),
            })
            .collect();
        assert_eq!(shape, ["a", "b?else:4", "c", "jump:6", "d", "e", "f"]);
    }
}
