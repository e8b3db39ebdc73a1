//! `distill report RUN_DIR [RUN_DIR…]`: draws a run directory's `report.html` again, or one
//! page overlaying several runs' curves (`coordinator::report_html` owns the page).

use std::path::PathBuf;

use anyhow::Context;
use coordinator::report_html::{self, RunFiles};

/// Flags of `distill report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Run directories (written by `distill demo`, `distill coordinator` or `distill train`
    /// runs): one draws its own `report.html`; several are compared on one page.
    #[arg(required = true, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// Where to write the page. Default: `RUN_DIR/report.html` for one run, `compare.html` in
    /// the current directory for several.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Runs `distill report`.
pub fn run(a: ReportArgs) -> anyhow::Result<()> {
    let runs = a
        .runs
        .iter()
        .map(|d| {
            RunFiles::read(d).with_context(|| format!("reading run directory {}", d.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out = match (&a.out, runs.as_slice()) {
        (Some(p), _) => p.clone(),
        (None, [one]) => one.dir.join(report_html::REPORT_HTML),
        (None, _) => PathBuf::from("compare.html"),
    };
    report_html::write_comparison(&runs, &out)
        .with_context(|| format!("writing {}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}
