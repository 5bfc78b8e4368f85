//! `merge A.json B.json …`: one report from the `--json` results of several
//! runs (several load machines started with the same `--start-at`). Each
//! file carries its raw measurements (`raw`: counters and histograms), so
//! the merge is exact: counts are summed, latency percentiles come from the
//! merged histograms (never from averaged percentiles), and the per-second
//! series are aligned on the wall clock.

use std::path::Path;

use serde_json::Value;

use crate::cli::MergeArgs;
use crate::report::{Report, RunData};

/// One run's results, as read from its `--json` file.
#[derive(Debug, Clone)]
pub struct Input {
    /// The raw measurements.
    pub raw: RunData,
    /// Group display order.
    pub order: Vec<String>,
    /// Target URL.
    pub target: String,
    /// The run's options.
    pub params: Value,
    /// The run's warnings.
    pub warnings: Vec<String>,
}

/// Reads one `--json` file.
pub fn read(path: &Path) -> Result<Input, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
    let raw = v.get("raw").cloned().ok_or_else(|| {
        format!("{}: no `raw` section (written by an older portcullis-loadtest?)", path.display())
    })?;
    let raw: RunData = serde_json::from_value(raw).map_err(|e| format!("{}: raw: {e}", path.display()))?;
    let strings = |k: &str| -> Vec<String> {
        v.get(k)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|x| x.as_str().map(String::from)).collect())
            .unwrap_or_default()
    };
    Ok(Input {
        order: strings("group_order"),
        target: v.get("target").and_then(Value::as_str).unwrap_or_default().to_string(),
        params: v.get("params").cloned().unwrap_or(Value::Null),
        warnings: strings("warnings"),
        raw,
    })
}

/// Merges already-read results into one report.
pub fn merge_reports(paths: &[String], inputs: &[Input]) -> Result<Report, String> {
    let Some(first) = inputs.first() else {
        return Err("merge: no input".into());
    };
    let scenario = first.raw.scenario.clone();
    if let Some((i, x)) = inputs.iter().enumerate().find(|(_, x)| x.raw.scenario != scenario) {
        let name = |i: usize| paths.get(i).cloned().unwrap_or_default();
        return Err(format!(
            "merge: {} is a {} run, {} a {} run",
            name(i),
            x.raw.scenario,
            name(0),
            scenario
        ));
    }
    let mut order: Vec<String> = Vec::new();
    let mut targets: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    for Input { order: o, target: t, warnings: w, .. } in inputs {
        for n in o {
            if !order.contains(n) {
                order.push(n.clone());
            }
        }
        if !targets.contains(t) {
            targets.push(t.clone());
        }
        for x in w {
            if !warnings.contains(x) {
                warnings.push(x.clone());
            }
        }
    }
    let runs: Vec<RunData> = inputs.iter().map(|x| x.raw.clone()).collect();
    let merged = RunData::merge_runs(&runs);
    let params = serde_json::json!({
        "merged_from": paths,
        "runs": inputs.iter().map(|x| x.params.clone()).collect::<Vec<_>>(),
    });
    let mut report = Report::new(&merged, &order, targets.join(" + "), params, None);
    report.warnings = warnings;
    Ok(report)
}

/// The `merge` command.
pub fn run(m: &MergeArgs) -> Result<(), String> {
    let inputs = m.inputs.iter().map(|p| read(p)).collect::<Result<Vec<_>, _>>()?;
    let paths: Vec<String> = m.inputs.iter().map(|p| p.display().to_string()).collect();
    let report = merge_reports(&paths, &inputs)?;
    print!("{}", report.table());
    if let Some(p) = &m.json {
        let text = serde_json::to_string_pretty(&report.to_json()).map_err(|e| e.to_string())?;
        std::fs::write(p, text + "\n").map_err(|e| format!("--json {}: {e}", p.display()))?;
    }
    if let Some(p) = &m.html {
        std::fs::write(p, crate::html::render(&report))
            .map_err(|e| format!("--html {}: {e}", p.display()))?;
    }
    Ok(())
}
