//! Processes moat starts and watches: the supervisor, its guard, the
//! router. A process is known by its pid and its start time, so a reused pid
//! is not taken for it.

/// Is the process `pid`, started at `start` ticks, still alive?
pub fn process_alive(pid: u32, start: u64) -> bool {
    process_start_time(pid) == Some(start)
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat`,
/// field 22); `None` when it does not exist (or is a zombie).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Makes `cmd` start in a session of its own, so that closing the
/// starter's terminal or a Ctrl+C aimed at the starter does not reach it
/// (the supervisor, the router).
pub(crate) fn detach(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let start = process_start_time(pid).unwrap();
        assert!(process_alive(pid, start));
        assert!(!process_alive(pid, start + 1));
        assert!(!process_alive(u32::MAX - 1, start));
    }
}
