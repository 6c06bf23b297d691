//! A run of a known agent: the agent presets of [`crate::agent`] applied
//! to a plan. (Here, not in `agent`, so that `agent` stays below `run`.)

use crate::agent::{Agent, AgentOptions, AgentPlan};
use crate::config::{GrantRef, Overrides};
use crate::error::{Error, ErrorKind, Result};
use crate::policy::HostPattern;

use super::RunPlan;

impl RunPlan {
    /// Plans a run of Claude Code in `workspace` ([`RunPlan::agent`] with
    /// [`Agent::Claude`]).
    pub fn claude(
        workspace: &std::path::Path,
        overrides: &Overrides,
        options: &AgentOptions,
    ) -> Result<RunPlan> {
        RunPlan::agent(Agent::Claude, workspace, overrides, options)
    }

    /// Plans a run of a known agent in `workspace`: the workspace's
    /// configuration and `overrides` as for any run, then the agent's
    /// preset ([`crate::agent::preset`]): the grants it implies, the hosts
    /// it needs in strict mode, its command and environment, and an image
    /// of the base image with the agent in it (made when the run starts).
    pub fn agent(
        agent: Agent,
        workspace: &std::path::Path,
        overrides: &Overrides,
        options: &AgentOptions,
    ) -> Result<RunPlan> {
        let preset = crate::agent::preset(agent);
        if overrides.command.is_some() {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("moat {agent} runs {agent}: give its arguments after --, not a command"),
            ));
        }
        let config = crate::config::load(workspace)?.merge(overrides)?;
        // The flag, else the workspace's configuration, else the pinned one.
        let asked = options
            .version
            .clone()
            .or_else(|| preset.configured_version(&config));
        let mut plan = RunPlan::from_config(config)?;
        let version = preset.version(asked.as_deref())?;
        for grant in preset.grants() {
            if !plan.grants.iter().any(|g| g.provider == *grant) {
                plan.grants.push(
                    GrantRef::parse(grant).map_err(|e| {
                        Error::new(ErrorKind::Internal, format!("grant {grant}: {e}"))
                    })?,
                );
            }
        }
        for host in preset.hosts() {
            let pattern = HostPattern::parse(host)
                .map_err(|e| Error::new(ErrorKind::Internal, format!("{host}: {e}")))?;
            if !plan.network.allow.contains(&pattern) {
                plan.network.allow.push(pattern);
            }
        }
        for (key, value) in preset.env() {
            plan.env
                .entry(key.to_string())
                .or_insert_with(|| value.to_string());
        }
        plan.command = Some(preset.command(options.prompt.as_deref(), &options.args));
        plan.interactive = options.prompt.is_none();
        plan.agent = Some(AgentPlan { agent, version });
        Ok(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::claude;

    #[test]
    fn the_preset_adds_what_claude_needs_and_keeps_the_users_choices() {
        let ws = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            ws.path().join("agent.yaml"),
            "grants: [github]\nenv:\n  DISABLE_TELEMETRY: \"0\"\nnetwork:\n  policy: strict\n  allow: [pypi.org]\nclaude:\n  version: 2.1.332\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let options = AgentOptions {
            prompt: Some("hi".into()),
            version: None,
            args: vec!["--model".into(), "x".into()],
        };
        let plan = RunPlan::claude(ws.path(), &Overrides::default(), &options)
            .unwrap_or_else(|e| panic!("{e}"));
        let grants: Vec<String> = plan.grants.iter().map(ToString::to_string).collect();
        assert_eq!(grants, ["github", "anthropic"]);
        let allow: Vec<String> = plan.network.allow.iter().map(ToString::to_string).collect();
        assert!(allow.contains(&"pypi.org".to_string()), "{allow:?}");
        for host in claude::HOSTS {
            assert!(allow.contains(&host.to_string()), "{host}: {allow:?}");
        }
        assert_eq!(
            plan.env["DISABLE_TELEMETRY"], "0",
            "the user's value is kept"
        );
        assert_eq!(plan.env["CLAUDE_CONFIG_DIR"], claude::CONFIG_DIR);
        assert_eq!(
            plan.command.as_deref(),
            Some(&["claude", "-p", "hi", "--model", "x"].map(String::from)[..])
        );
        assert!(!plan.interactive);
        assert_eq!(
            plan.agent,
            Some(AgentPlan {
                agent: Agent::Claude,
                version: "2.1.332".into()
            })
        );
        // Interactive without a prompt; a command is refused.
        let plan = RunPlan::claude(ws.path(), &Overrides::default(), &AgentOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(plan.interactive);
        let err = RunPlan::claude(
            ws.path(),
            &Overrides {
                command: Some(vec!["sh".into()]),
                ..Overrides::default()
            },
            &AgentOptions::default(),
        )
        .map(|_| ())
        .unwrap_err()
        .to_string();
        assert!(err.contains("after --"), "{err}");
    }
}
