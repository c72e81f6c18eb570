//! Pictures of what learning did, as SVG: validation accuracy (and training reward) per step
//! of a run, and accuracy with and without a library from `experient eval`. The drawing is a
//! minijinja template; this module only places things.

use minijinja::context;

use super::eval::EvalReport;
use super::grpo::RunSummary;

const TEMPLATE: &str = include_str!("chart.svg.j2");
const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 620.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 350.0;
const COLORS: [&str; 4] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"];

/// y in [0, 1] to pixels.
fn y(v: f64) -> f64 {
    BOTTOM - v.clamp(0.0, 1.0) * (BOTTOM - TOP)
}

fn yticks() -> Vec<minijinja::Value> {
    (0..=5)
        .map(|i| {
            let v = f64::from(i) / 5.0;
            context! { y => y(v), label => format!("{v:.1}") }
        })
        .collect()
}

fn render(ctx: minijinja::Value) -> String {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.render_str(TEMPLATE, ctx)
        .expect("the chart template renders with any data")
}

/// Validation accuracy per step (step 0 is the library the run started from) and the mean
/// reward of each step's attempts.
pub fn run_chart(run: &RunSummary) -> String {
    let steps = run.steps.len().max(1) as f64;
    let x = |s: f64| LEFT + 20.0 + s / steps * (RIGHT - LEFT - 40.0);
    let mut series = Vec::new();
    let mut val: Vec<(f64, f64)> = run
        .baseline_validation
        .map(|b| (0.0, b))
        .into_iter()
        .collect();
    val.extend(
        run.steps
            .iter()
            .filter_map(|s| s.validation.as_ref().map(|v| (s.step as f64, v.accuracy))),
    );
    let reward: Vec<(f64, f64)> = run
        .steps
        .iter()
        .map(|s| (s.step as f64, s.mean_reward))
        .collect();
    for (i, (name, pts)) in [
        ("validation accuracy", val),
        ("mean reward of attempts", reward),
    ]
    .into_iter()
    .enumerate()
    {
        if pts.is_empty() {
            continue;
        }
        series.push(context! {
            name => name,
            color => COLORS[i],
            points => pts.iter().map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b))).collect::<Vec<_>>().join(" "),
            dots => pts.iter().map(|(a, b)| context! { x => x(*a), y => y(*b) }).collect::<Vec<_>>(),
        });
    }
    let xticks: Vec<_> = (0..=run.steps.len())
        .map(|s| context! { x => x(s as f64), label => s.to_string() })
        .collect();
    render(context! {
        width => W, height => H, left => LEFT, right => RIGHT, top => TOP, bottom => BOTTOM,
        title => format!("Learning run {} (library {})", run.run, run.library),
        xlabel => "step", ylabel => "accuracy / reward",
        yticks => yticks(), xticks => xticks, series => series, bars => Vec::<()>::new(),
    })
}

/// Accuracy of each arm with its 95% confidence interval.
pub fn eval_chart(report: &EvalReport) -> String {
    let n = report.arms.len().max(1) as f64;
    let slot = (RIGHT - LEFT) / n;
    let bars: Vec<_> = report
        .arms
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let x0 = LEFT + slot * i as f64 + slot * 0.2;
            let w = slot * 0.6;
            context! {
                x => x0, w => w, y => y(a.accuracy), h => BOTTOM - y(a.accuracy),
                cx => x0 + w / 2.0, lo => y(a.ci95[0]), hi => y(a.ci95[1]),
                color => COLORS[i % COLORS.len()],
                label => format!("{:.3}", a.accuracy),
            }
        })
        .collect();
    let xticks: Vec<_> = report
        .arms
        .iter()
        .enumerate()
        .map(|(i, a)| {
            context! {
                x => LEFT + slot * (i as f64 + 0.5),
                label => match &a.library { Some(l) => format!("with {l}"), None => "without a library".into() },
            }
        })
        .collect();
    render(context! {
        width => W, height => H, left => LEFT, right => RIGHT, top => TOP, bottom => BOTTOM,
        title => format!("{} on {} ({} tasks)", report.model, report.dataset, report.arms.first().map_or(0, |a| a.tasks)),
        xlabel => "", ylabel => "accuracy (95% CI)",
        yticks => yticks(), xticks => xticks, series => Vec::<()>::new(), bars => bars,
    })
}

#[cfg(test)]
mod tests {
    use super::super::eval::{Arm, EvalReport};
    use super::*;

    #[test]
    fn eval_chart_is_well_formed_svg() {
        let svg = eval_chart(&EvalReport {
            dataset: "gsm8k".into(),
            model: "m".into(),
            arms: vec![
                Arm {
                    library: None,
                    tasks: 10,
                    samples: 1,
                    accuracy: 0.3,
                    ci95: [0.1, 0.5],
                    experiences: 0,
                },
                Arm {
                    library: Some("lib".into()),
                    tasks: 10,
                    samples: 1,
                    accuracy: 0.4,
                    ci95: [0.2, 0.6],
                    experiences: 3,
                },
            ],
        });
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<rect x=").count(), 2, "{svg}");
        assert!(svg.contains("with lib") && svg.contains("0.400"));
    }
}
