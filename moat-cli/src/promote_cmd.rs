//! `moat promote`: a run's artifacts copied to where `destroy` and `clean`
//! do not reach them, over `moat_core::run::promote`.

use std::path::PathBuf;

use clap::Args;
use moat_core::run;
use moat_core::{paths, Error, ErrorKind};

use crate::write_stdout;

#[derive(Args, Debug)]
#[command(after_help = "\
Copies every file of a run that is over (run.json, logs.jsonl, network.jsonl,
the audit log, supervisor.log), a proof bundle of its audit log
(audit-bundle.json, for `moat verify-bundle`) and promoted.json (each file's
size and SHA-256). Workspace changes are not copied: moat mounts the
workspace read-write and keeps no record of them; they are in the workspace.

Prints the directory; --json prints what was copied.")]
pub struct PromoteArgs {
    /// Run id, id prefix or name (default: the most recent run)
    pub run: Option<String>,
    /// Copy to this directory (new or empty) instead of
    /// $MOAT_HOME/promoted/<run-id>/
    #[arg(long, value_name = "DIR")]
    pub to: Option<PathBuf>,
    /// Print what was copied as JSON
    #[arg(long)]
    pub json: bool,
}

pub fn cmd_promote(args: &PromoteArgs) -> Result<(), Error> {
    let home = paths::moat_home()?;
    let meta = run::find(&home, args.run.as_deref())?;
    let promoted = run::promote::promote(&home, &meta.id, args.to.as_deref())?;
    if args.json {
        let text = serde_json::to_string_pretty(&promoted)
            .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot encode json: {e}")))?;
        return write_stdout(&(text + "\n"));
    }
    write_stdout(&format!("{}\n", promoted.dir.display()))?;
    eprintln!(
        "Promoted {} ({}): {} file(s) copied to {}; `moat destroy` and `moat clean` leave them there.",
        promoted.name,
        promoted.run,
        promoted.files.len(),
        promoted.dir.display()
    );
    match (&promoted.bundle, &promoted.bundle_problem) {
        (Some(bundle), _) => eprintln!(
            "The audit log's proof bundle is {bundle}: check it with `moat verify-bundle {}`.",
            promoted.dir.join(bundle).display()
        ),
        (None, Some(problem)) => {
            eprintln!("warning: no proof bundle of the audit log: {problem}")
        }
        (None, None) => {}
    }
    eprintln!(
        "Workspace changes are not copied: moat keeps no record of them (they are in {}).",
        moat_core::run::trace_view::printable(&promoted.workspace.display().to_string())
    );
    Ok(())
}
