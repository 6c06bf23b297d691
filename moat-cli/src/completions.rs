//! What the shell sees of moat's command line: `moat completions` (scripts
//! from `clap_complete`) and the suggestions for a mistyped command. Both
//! leave out the hidden internal commands (`_supervise`, `_router`), which
//! only moat itself starts.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Args, CommandFactory, Parser, ValueEnum};
use moat_core::Error;

use crate::write_stdout;

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh or fish
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The shells moat writes completions for.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

pub fn cmd_completions(args: &CompletionsArgs) -> Result<(), Error> {
    write_stdout(&script(args.shell))
}

/// The completion script for `shell`.
pub fn script(shell: Shell) -> String {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut cmd = visible(crate::Cli::command());
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "moat", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// moat's command line without its hidden subcommands (clap_complete would
/// offer them). There are hidden ones at the top only (the test says so).
fn visible(cmd: clap::Command) -> clap::Command {
    let mut out = clap::Command::new("moat")
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommand_required(cmd.is_subcommand_required_set());
    if let Some(about) = cmd.get_about() {
        out = out.about(about.clone());
    }
    out.subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

/// Parses the command line as `T::parse` does, but a mistyped command is
/// never answered with a hidden one ("a similar subcommand exists:
/// '_router'").
pub fn parse<T: Parser>() -> T {
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(err) => without_hidden_suggestions(err, &T::command()).exit(),
    }
}

/// `err` with the hidden commands taken out of its suggestions; when none
/// is left, the error clap gives for a word like no command at all.
pub fn without_hidden_suggestions(mut err: clap::Error, cmd: &clap::Command) -> clap::Error {
    if err.kind() != ErrorKind::InvalidSubcommand {
        return err;
    }
    let Some(ContextValue::Strings(suggested)) = err.get(ContextKind::SuggestedSubcommand) else {
        return err;
    };
    let hidden = hidden_names(cmd);
    let kept: Vec<String> = suggested
        .iter()
        .filter(|s| !hidden.contains(s))
        .cloned()
        .collect();
    if kept.len() == suggested.len() {
        return err;
    }
    if !kept.is_empty() {
        err.insert(
            ContextKind::SuggestedSubcommand,
            ContextValue::Strings(kept),
        );
        return err;
    }
    let typed = match err.get(ContextKind::InvalidSubcommand) {
        Some(ContextValue::String(typed)) => typed.clone(),
        _ => return err,
    };
    let mut cmd = cmd.clone();
    let mut plain = clap::Error::new(ErrorKind::InvalidSubcommand).with_cmd(&cmd);
    plain.insert(ContextKind::InvalidSubcommand, ContextValue::String(typed));
    plain.insert(
        ContextKind::Usage,
        ContextValue::StyledStr(cmd.render_usage()),
    );
    plain
}

/// The names and aliases of the hidden subcommands, at any depth.
fn hidden_names(cmd: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() {
            out.push(sub.get_name().to_string());
            out.extend(sub.get_all_aliases().map(str::to_string));
        }
        out.extend(hidden_names(sub));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(cmd: &clap::Command) -> Vec<String> {
        let mut out = Vec::new();
        for sub in cmd.get_subcommands() {
            out.push(sub.get_name().to_string());
            out.extend(names(sub));
        }
        out
    }

    #[test]
    fn completions_offer_no_hidden_command() {
        let cmd = crate::Cli::command();
        assert!(!hidden_names(&cmd).is_empty(), "moat has internal commands");
        let shown = visible(cmd);
        for hidden in hidden_names(&crate::Cli::command()) {
            assert!(!names(&shown).contains(&hidden), "{hidden}");
        }
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = script(shell);
            assert!(text.contains("promote"), "{shell:?}");
            assert!(text.contains("system"), "{shell:?}");
            assert!(!text.contains("_supervise"), "{shell:?}");
            assert!(!text.contains("_router"), "{shell:?}");
        }
    }

    fn message(args: &[&str]) -> String {
        let err = crate::Cli::try_parse_from(args).expect_err("not a command");
        without_hidden_suggestions(err, &crate::Cli::command()).to_string()
    }

    #[test]
    fn a_mistyped_command_is_never_answered_with_a_hidden_one() {
        let text = message(&["moat", "prommote"]);
        assert!(text.contains("'promote'"), "{text}");
        assert!(
            !text.contains("_router") && !text.contains("_supervise"),
            "{text}"
        );
        // A word close to a hidden command alone gets no tip at all.
        let text = message(&["moat", "_routr"]);
        assert!(text.contains("unrecognized subcommand '_routr'"), "{text}");
        assert!(
            !text.contains("_router") && !text.contains("tip:"),
            "{text}"
        );
        assert!(text.contains("Usage: moat"), "{text}");
        // Visible suggestions are kept.
        let text = message(&["moat", "lsit"]);
        assert!(text.contains("'list'"), "{text}");
    }
}
