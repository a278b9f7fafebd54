//! `hibiki trace report`: where the time of a run went, from the spans
//! `hibiki trace collect` wrote.
//!
//! - **Time per stage**: for each span name, its total time and its self
//!   time (total minus the time covered by its synchronous children), p50
//!   and p99. A queue hop (a child that starts after its parent ended: the
//!   event log, delivery's queue, the membership stream) is a stage of its
//!   own, `parent ⇢ child`, whose time is the wait between them.
//! - **Queue wait versus work** along each trace's critical path.
//! - **The critical path** of the slowest traces: the chain of spans that
//!   ends last, each hop's work and each queue's wait, adding up to the
//!   trace's duration.
//! - **The top bottleneck**: the stage with the largest share of the
//!   slowest 1 % of traces' critical paths.

use std::collections::HashMap;
use std::fmt::Write;

use hibiki_runtime::otlp::Span;

/// A stage's display name: a gRPC method path
/// (`/hibiki.contacts.v1.ContactService/AddTags`) becomes
/// `contacts.AddTags`; other span names stay as they are.
pub fn stage(name: &str) -> String {
    if let Some(path) = name.strip_prefix('/')
        && let Some((service, method)) = path.split_once('/')
    {
        let package = service.split('.').nth(1).unwrap_or(service);
        return format!("{package}.{method}");
    }
    name.to_owned()
}

/// One piece of a critical path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The stage: a span's stage name, or `parent ⇢ child` for a queue hop.
    pub stage: String,
    /// True for a wait in a queue, false for work inside a span.
    pub wait: bool,
    /// Nanoseconds.
    pub ns: u64,
}

/// One trace's spans, linked.
struct Trace<'a> {
    spans: Vec<&'a Span>,
    children: HashMap<usize, Vec<usize>>,
    parent: Vec<Option<usize>>,
}

impl<'a> Trace<'a> {
    fn new(spans: Vec<&'a Span>) -> Self {
        let index: HashMap<&str, usize> = spans
            .iter()
            .enumerate()
            .map(|(i, s)| (s.span_id.as_str(), i))
            .collect();
        let parent: Vec<Option<usize>> = spans
            .iter()
            .map(|s| index.get(s.parent_span_id.as_str()).copied())
            .collect();
        let mut children: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, p) in parent.iter().enumerate() {
            if let Some(p) = p {
                children.entry(*p).or_default().push(i);
            }
        }
        Self {
            spans,
            children,
            parent,
        }
    }

    /// True when every span's parent is in the trace, but for one root
    /// (whose parent may be a caller's span that was never exported).
    fn complete(&self) -> bool {
        self.parent.iter().filter(|p| p.is_none()).count() == 1
    }

    /// The name of the span without a parent in the trace.
    fn root_name(&self) -> Option<&str> {
        self.parent
            .iter()
            .position(Option::is_none)
            .map(|i| self.spans[i].name.as_str())
    }

    fn start(&self) -> u64 {
        self.spans.iter().map(|s| s.start_ns).min().unwrap_or(0)
    }

    fn end(&self) -> u64 {
        self.spans.iter().map(|s| s.end_ns).max().unwrap_or(0)
    }

    /// Children that run within the span (not across a queue).
    fn sync_children(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        let s = self.spans[i];
        self.children
            .get(&i)
            .into_iter()
            .flatten()
            .copied()
            .filter(move |&c| self.spans[c].start_ns < s.end_ns)
    }

    /// The span's own time: its duration less the union of its synchronous
    /// children's intervals (clipped to it).
    fn self_ns(&self, i: usize) -> u64 {
        let s = self.spans[i];
        let mut covered: Vec<(u64, u64)> = self
            .sync_children(i)
            .map(|c| {
                let c = self.spans[c];
                (c.start_ns.max(s.start_ns), c.end_ns.min(s.end_ns))
            })
            .filter(|(a, b)| a < b)
            .collect();
        covered.sort_unstable();
        let mut union = 0;
        let mut at = s.start_ns;
        for (a, b) in covered {
            let a = a.max(at);
            if b > a {
                union += b - a;
                at = b;
            }
        }
        s.duration_ns().saturating_sub(union)
    }

    /// The critical path inside span `i` from its start to `until`, pushed
    /// in reverse order of time: the span's own time after the
    /// latest-ending synchronous child that ends by the cursor, that child's
    /// path, then what ran before it, and so on.
    fn path_within(&self, i: usize, until: u64, out: &mut Vec<Segment>) {
        let s = self.spans[i];
        let own = |ns: u64, out: &mut Vec<Segment>| {
            if ns > 0 {
                out.push(Segment {
                    stage: stage(&s.name),
                    wait: false,
                    ns,
                });
            }
        };
        let mut cursor = until.min(s.end_ns).max(s.start_ns);
        loop {
            let next = self
                .sync_children(i)
                .filter(|&c| self.spans[c].end_ns <= cursor && self.spans[c].start_ns < cursor)
                .max_by_key(|&c| self.spans[c].end_ns);
            let Some(c) = next else { break };
            own(cursor - self.spans[c].end_ns, out);
            self.path_within(c, self.spans[c].end_ns, out);
            cursor = self.spans[c].start_ns.max(s.start_ns);
        }
        own(cursor - s.start_ns, out);
    }

    /// The critical path: from the root to the span that ends last, in
    /// order of time. Its segments add up to the trace's duration.
    fn critical_path(&self) -> Vec<Segment> {
        let Some(last) = (0..self.spans.len()).max_by_key(|&i| self.spans[i].end_ns) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        self.path_within(last, self.spans[last].end_ns, &mut out);
        let mut child = last;
        while let Some(p) = self.parent[child] {
            let (ps, cs) = (self.spans[p], self.spans[child]);
            if cs.start_ns >= ps.end_ns {
                out.push(Segment {
                    stage: format!("{} ⇢ {}", stage(&ps.name), stage(&cs.name)),
                    wait: true,
                    ns: cs.start_ns - ps.end_ns,
                });
                self.path_within(p, ps.end_ns, &mut out);
            } else {
                self.path_within(p, cs.start_ns, &mut out);
            }
            child = p;
        }
        out.reverse();
        out
    }
}

/// Nearest-rank quantile of sorted values.
fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(ns: u64) -> String {
    let ms = ns as f64 / 1e6;
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.2}")
    }
}

/// What the report found, for a caller that wants figures rather than
/// text (and for tests).
#[derive(Debug)]
pub struct Report {
    /// The printable report.
    pub text: String,
    /// Complete traces analysed.
    pub traces: usize,
    /// Traces left out because a span's parent was missing.
    pub incomplete: usize,
}

#[derive(Default)]
struct StageTimes {
    self_ns: Vec<u64>,
    total_ns: Vec<u64>,
    wait: bool,
}

/// Analyses the spans of one run. `slowest` is how many of the slowest
/// traces' critical paths are printed; with `root`, only the traces that
/// start with a span of that name count (e.g. `webhook`: the taps, not the
/// checks a storm makes afterwards).
pub fn analyse(spans: &[Span], slowest: usize, root: Option<&str>) -> Report {
    let mut by_trace: HashMap<&str, Vec<&Span>> = HashMap::new();
    for s in spans {
        by_trace.entry(s.trace_id.as_str()).or_default().push(s);
    }
    let mut traces = Vec::new();
    let mut incomplete = 0;
    for (id, spans) in by_trace {
        let t = Trace::new(spans);
        if !t.complete() {
            incomplete += 1;
        } else if root.is_none_or(|name| t.root_name() == Some(name)) {
            traces.push((id, t));
        }
    }
    // Slowest first; ties by id so the report is stable.
    traces.sort_by(|(ia, a), (ib, b)| {
        (b.end() - b.start())
            .cmp(&(a.end() - a.start()))
            .then(ia.cmp(ib))
    });

    let mut stages: HashMap<String, StageTimes> = HashMap::new();
    let mut durations = Vec::with_capacity(traces.len());
    let mut waits = Vec::with_capacity(traces.len());
    let mut works = Vec::with_capacity(traces.len());
    let mut paths = Vec::with_capacity(traces.len());
    for (_, t) in &traces {
        for i in 0..t.spans.len() {
            let e = stages.entry(stage(&t.spans[i].name)).or_default();
            e.self_ns.push(t.self_ns(i));
            e.total_ns.push(t.spans[i].duration_ns());
            if let Some(p) = t.parent[i] {
                let (ps, cs) = (t.spans[p], t.spans[i]);
                if cs.start_ns >= ps.end_ns {
                    let hop = format!("{} ⇢ {}", stage(&ps.name), stage(&cs.name));
                    let e = stages.entry(hop).or_default();
                    e.wait = true;
                    e.self_ns.push(cs.start_ns - ps.end_ns);
                    e.total_ns.push(cs.start_ns - ps.end_ns);
                }
            }
        }
        let path = t.critical_path();
        durations.push(t.end() - t.start());
        waits.push(path.iter().filter(|s| s.wait).map(|s| s.ns).sum::<u64>());
        works.push(path.iter().filter(|s| !s.wait).map(|s| s.ns).sum::<u64>());
        paths.push(path);
    }

    let mut text = String::new();
    let span_count: usize = traces.iter().map(|(_, t)| t.spans.len()).sum();
    let _ = writeln!(
        text,
        "{} traces ({} spans){}",
        traces.len(),
        span_count,
        if incomplete > 0 {
            format!(
                "; {incomplete} incomplete traces left out (a span's parent never arrived: \
                 sampled out upstream, or dropped by a full export queue)"
            )
        } else {
            String::new()
        }
    );
    if traces.is_empty() {
        return Report {
            text,
            traces: 0,
            incomplete,
        };
    }
    let mut sorted = durations.clone();
    sorted.sort_unstable();
    let _ = writeln!(
        text,
        "trace duration (first span's start to last span's end): p50 {} ms, p99 {} ms, max {} ms\n",
        ms(quantile(&sorted, 0.5)),
        ms(quantile(&sorted, 0.99)),
        ms(*sorted.last().unwrap())
    );

    // Time per stage.
    let _ = writeln!(text, "time per stage (ms; a queue hop's time is its wait)");
    let _ = writeln!(
        text,
        "  {:<52} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "stage", "spans", "self p50", "self p99", "total p50", "total p99"
    );
    let mut rows: Vec<(String, StageTimes)> = stages.into_iter().collect();
    for (_, times) in rows.iter_mut() {
        times.self_ns.sort_unstable();
        times.total_ns.sort_unstable();
    }
    rows.sort_by(|a, b| {
        quantile(&b.1.self_ns, 0.99)
            .cmp(&quantile(&a.1.self_ns, 0.99))
            .then(a.0.cmp(&b.0))
    });
    for (name, t) in &rows {
        let label = if t.wait {
            format!("queue {name}")
        } else {
            name.clone()
        };
        let _ = writeln!(
            text,
            "  {:<52} {:>8} {:>9} {:>9} {:>9} {:>9}",
            label,
            t.total_ns.len(),
            ms(quantile(&t.self_ns, 0.5)),
            ms(quantile(&t.self_ns, 0.99)),
            ms(quantile(&t.total_ns, 0.5)),
            ms(quantile(&t.total_ns, 0.99)),
        );
    }

    // Queue wait versus work.
    let total_wait: u64 = waits.iter().sum();
    let total_work: u64 = works.iter().sum();
    waits.sort_unstable();
    works.sort_unstable();
    let _ = writeln!(
        text,
        "\nqueue wait versus work along the critical path, per trace:\n  \
         wait p50 {} ms, p99 {} ms; work p50 {} ms, p99 {} ms; \
         waiting is {:.0} % of all critical-path time",
        ms(quantile(&waits, 0.5)),
        ms(quantile(&waits, 0.99)),
        ms(quantile(&works, 0.5)),
        ms(quantile(&works, 0.99)),
        100.0 * total_wait as f64 / (total_wait + total_work).max(1) as f64
    );

    // The slowest traces' critical paths.
    let _ = writeln!(
        text,
        "\ncritical path of the {} slowest traces",
        slowest.min(traces.len())
    );
    for ((id, t), path) in traces.iter().zip(&paths).take(slowest) {
        let _ = writeln!(text, "  trace {id}: {} ms", ms(t.end() - t.start()));
        for seg in path.iter().filter(|s| s.ns > 0) {
            let _ = writeln!(
                text,
                "    {:<6} {:<52} {:>9} ms",
                if seg.wait { "wait" } else { "work" },
                seg.stage,
                ms(seg.ns)
            );
        }
    }

    // The bottleneck: the largest share of the slowest 1 %'s paths.
    let tail = (traces.len() / 100).max(1);
    let mut share: HashMap<&str, u64> = HashMap::new();
    let mut tail_total = 0;
    for path in paths.iter().take(tail) {
        for seg in path {
            *share.entry(seg.stage.as_str()).or_default() += seg.ns;
            tail_total += seg.ns;
        }
    }
    let bottleneck = share
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
        .map(|(stage, ns)| ((*stage).to_owned(), *ns as f64 / tail_total.max(1) as f64));
    let is_wait = |stage: &str| rows.iter().any(|(n, t)| n == stage && t.wait);
    if let Some((stage, fraction)) = &bottleneck {
        let _ = writeln!(
            text,
            "\ntop bottleneck: {}{stage}, {:.0} % of the critical paths of the slowest {} traces (1 %)",
            if is_wait(stage) { "the queue " } else { "" },
            100.0 * fraction,
            tail
        );
        // A queue is a symptom: name the work that drains it too, the
        // largest share of all traces' critical-path work.
        if is_wait(stage) {
            let mut work: HashMap<&str, u64> = HashMap::new();
            for seg in paths.iter().flatten().filter(|s| !s.wait) {
                *work.entry(seg.stage.as_str()).or_default() += seg.ns;
            }
            if let Some((name, ns)) = work.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))) {
                let _ = writeln!(
                    text,
                    "top work stage: {name}, {:.0} % of the work on all traces' critical paths",
                    100.0 * *ns as f64 / total_work.max(1) as f64
                );
            }
        }
    }
    Report {
        text,
        traces: traces.len(),
        incomplete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, trace: &str, id: &str, parent: &str, start: u64, end: u64) -> Span {
        Span {
            name: name.into(),
            trace_id: trace.into(),
            span_id: id.into(),
            parent_span_id: parent.into(),
            service_name: "test".into(),
            start_ns: start * 1_000_000,
            end_ns: end * 1_000_000,
        }
    }

    /// A tap: the webhook (0–2 ms) appends to the log; scenario picks it up
    /// at 10 ms and calls contacts (11–15) and delivery (16–18); delivery's
    /// worker calls LINE at 40–45 ms.
    fn tap(trace: &str, line_at: u64) -> Vec<Span> {
        vec![
            span("webhook", trace, "a", "", 0, 2),
            span("scenario.event", trace, "b", "a", 10, 20),
            span(
                "/hibiki.contacts.v1.ContactService/AddTags",
                trace,
                "c",
                "b",
                11,
                15,
            ),
            span(
                "/hibiki.delivery.v1.DeliveryService/LinkRichMenu",
                trace,
                "d",
                "b",
                16,
                18,
            ),
            span("delivery.line_call", trace, "e", "d", line_at, line_at + 5),
        ]
    }

    #[test]
    fn grpc_paths_become_service_and_method() {
        assert_eq!(
            stage("/hibiki.contacts.v1.ContactService/AddTags"),
            "contacts.AddTags"
        );
        assert_eq!(stage("scenario.event"), "scenario.event");
    }

    #[test]
    fn the_critical_path_adds_up_to_the_trace_and_separates_queue_waits() {
        let spans = tap("t1", 40);
        let t = Trace::new(spans.iter().collect());
        let path = t.critical_path();
        let got: Vec<(&str, bool, u64)> = path
            .iter()
            .map(|s| (s.stage.as_str(), s.wait, s.ns / 1_000_000))
            .collect();
        assert_eq!(
            got,
            vec![
                ("webhook", false, 2),
                ("webhook ⇢ scenario.event", true, 8),
                // Before the link: its own work (1 ms + 1 ms) and contacts.
                ("scenario.event", false, 1),
                ("contacts.AddTags", false, 4),
                ("scenario.event", false, 1),
                ("delivery.LinkRichMenu", false, 2),
                ("delivery.LinkRichMenu ⇢ delivery.line_call", true, 22),
                ("delivery.line_call", false, 5),
            ]
        );
        let total: u64 = path.iter().map(|s| s.ns).sum();
        assert_eq!(total, t.end() - t.start());
        // Self time leaves out synchronous children, not queued ones.
        assert_eq!(t.self_ns(1), 4_000_000);
        assert_eq!(t.self_ns(3), 2_000_000);
    }

    #[test]
    fn the_report_names_the_stage_that_dominates_the_slowest_traces() {
        let mut spans = Vec::new();
        for n in 0..99 {
            spans.extend(tap(&format!("fast{n:02}"), 21));
        }
        // The slowest trace waited 2 s in delivery's queue.
        spans.extend(tap("slow", 2_018));
        // A trace with two spans whose parents never arrived.
        spans.push(span("scenario.event", "orphan", "x", "missing", 0, 1));
        spans.push(span("delivery.line_call", "orphan", "y", "gone", 5, 6));
        let report = analyse(&spans, 1, None);
        assert_eq!(report.traces, 100);
        assert_eq!(report.incomplete, 1);
        assert!(
            report.text.contains("trace slow: 2023 ms"),
            "{}",
            report.text
        );
        assert!(
            report.text.contains(
                "top bottleneck: the queue delivery.LinkRichMenu ⇢ delivery.line_call, 99 %"
            ),
            "{}",
            report.text
        );
        assert!(
            report.text.contains(
                "top work stage: delivery.line_call, 33 % of the work on all traces' critical paths"
            ),
            "{}",
            report.text
        );
        assert!(
            report.text.contains("1 incomplete traces left out"),
            "{}",
            report.text
        );
    }

    #[test]
    fn a_root_name_keeps_only_the_traces_it_starts() {
        let mut spans = tap("tap", 21);
        // A check made after the storm: a trace of its own.
        spans.push(span(
            "/hibiki.contacts.v1.ContactService/GetContact",
            "check",
            "z",
            "",
            0,
            1,
        ));
        assert_eq!(analyse(&spans, 1, None).traces, 2);
        let taps = analyse(&spans, 1, Some("webhook"));
        assert_eq!(taps.traces, 1);
        assert!(!taps.text.contains("contacts.GetContact"), "{}", taps.text);
    }

    #[test]
    fn no_spans_is_an_empty_report_not_a_panic() {
        let report = analyse(&[], 3, None);
        assert_eq!(report.traces, 0);
        assert!(!report.text.contains("bottleneck"));
    }
}
