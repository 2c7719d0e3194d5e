//! The links a sweep migrates over: TCP loopback, or two network namespaces ("hosts")
//! joined by a veth pair, optionally shaped with `tc netem`.

use std::process::Command;

/// A link kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Link {
    /// Both processes on this host, TCP over loopback.
    Loopback,
    /// Two namespaces over a veth pair, unshaped.
    Veth,
    /// Two namespaces, the link shaped to 1 Gbit/s.
    #[value(name = "1g")]
    #[serde(rename = "1g")]
    OneGbit,
    /// Two namespaces, 10 Gbit/s with 0.1 ms of delay each way.
    #[value(name = "10g")]
    #[serde(rename = "10g")]
    TenGbit,
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Link::Loopback => "loopback",
            Link::Veth => "veth",
            Link::OneGbit => "1g",
            Link::TenGbit => "10g",
        })
    }
}

/// Two hosts (namespaces `names[0]` with 198.18.0.1 and `names[1]` with 198.18.0.2),
/// removed on drop; or nothing, for loopback.
pub struct Net {
    pub link: Link,
    names: Option<[String; 2]>,
    /// `--pin`: the CPU lists (taskset syntax) of the source and the destination.
    cpus: Option<[String; 2]>,
}

/// This machine's CPUs.
pub fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// `n` CPUs split in two halves (the source's, the destination's), in `taskset -c` syntax.
pub fn cpu_halves(n: usize) -> Result<[String; 2], String> {
    if n < 2 {
        return Err("--pin needs at least 2 CPUs".into());
    }
    let half = n / 2;
    let list = |from: usize, to: usize| if to == from + 1 { from.to_string() } else { format!("{from}-{}", to - 1) };
    Ok([list(0, half), list(half, n)])
}

fn run(args: &[&str]) -> Result<(), String> {
    let status = Command::new(args[0]).args(&args[1..]).status().map_err(|e| format!("{}: {e}", args[0]))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed (network namespaces need root, tc needs iproute2)", args.join(" ")))
    }
}

/// Shapes one end of the link: `tc netem` (rate and delay); where the kernel has no netem
/// (seen on this project's test host), a token bucket (`tbf`) for the rate alone.
fn shape(link: Link, namespace: &str, dev: &str) -> Result<(), String> {
    let (rate, delay) = match link {
        Link::OneGbit => ("1gbit", None),
        Link::TenGbit => ("10gbit", Some("100us")),
        Link::Loopback | Link::Veth => return Ok(()),
    };
    let tc = |args: &[&str]| {
        let mut command = vec!["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", dev, "root"];
        command.extend_from_slice(args);
        Command::new("ip").args(&command[1..]).stderr(std::process::Stdio::null()).status()
    };
    let mut netem = vec!["netem", "rate", rate, "limit", "100000"];
    if let Some(d) = delay {
        netem.extend(["delay", d]);
    }
    if tc(&netem).is_ok_and(|s| s.success()) {
        return Ok(());
    }
    if delay.is_some() {
        eprintln!("migration-bench: no netem in this kernel: link {link} gets its rate but no delay");
    }
    match tc(&["tbf", "rate", rate, "burst", "1mb", "latency", "50ms"]) {
        Ok(s) if s.success() => Ok(()),
        _ => Err(format!("tc cannot shape {dev} to {rate} (needs sch_netem or sch_tbf)")),
    }
}

impl Net {
    pub fn new(link: Link, pin: bool) -> Result<Net, String> {
        let cpus = if pin { Some(cpu_halves(cpus())?) } else { None };
        if link == Link::Loopback {
            return Ok(Net { link, names: None, cpus });
        }
        let id = std::process::id() % 100_000;
        let names = [format!("pkb{id}a"), format!("pkb{id}b")];
        let veth = [format!("pkv{id}a"), format!("pkv{id}b")];
        let net = Net { link, names: Some(names.clone()), cpus };
        for n in &names {
            run(&["ip", "netns", "add", n])?;
        }
        run(&["ip", "link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1]])?;
        for (i, n) in names.iter().enumerate() {
            let addr = format!("198.18.0.{}/30", i + 1);
            run(&["ip", "link", "set", &veth[i], "netns", n])?;
            run(&["ip", "-n", n, "addr", "add", &addr, "dev", &veth[i]])?;
            run(&["ip", "-n", n, "link", "set", &veth[i], "up"])?;
            run(&["ip", "-n", n, "link", "set", "lo", "up"])?;
            shape(link, n, &veth[i])?;
        }
        Ok(net)
    }

    /// The command prefix that runs a program on host `i` (0: source, 1: destination).
    pub fn prefix(&self, i: usize) -> Vec<String> {
        let mut prefix = Vec::new();
        if let Some(cpus) = &self.cpus {
            prefix.extend(["taskset".into(), "-c".into(), cpus[i].clone()]);
        }
        if let Some(names) = &self.names {
            prefix.extend(["ip".into(), "netns".into(), "exec".into(), names[i].clone()]);
        }
        prefix
    }

    /// A port for the next run's destination. Over loopback, one the kernel says is free
    /// (several sweeps may run at once, as the test suite's do, and a counter from each
    /// one's process id ran into another's: QEMU's destination then failed to listen);
    /// `fallback` where that cannot be asked (each namespace pair is this sweep's own).
    pub fn free_port(&self, fallback: u16) -> u16 {
        if self.names.is_some() {
            return fallback;
        }
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_or(fallback, |a| a.port())
    }

    /// The destination's address for `port`.
    pub fn destination(&self, port: u16) -> String {
        match self.names {
            Some(_) => format!("198.18.0.2:{port}"),
            None => format!("127.0.0.1:{port}"),
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in self.names.iter().flatten() {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::cpu_halves;

    #[test]
    fn cpus_split_in_two_halves_in_taskset_syntax() {
        assert_eq!(cpu_halves(2).unwrap(), ["0".to_string(), "1".to_string()]);
        assert_eq!(cpu_halves(3).unwrap(), ["0".to_string(), "1-2".to_string()]);
        assert_eq!(cpu_halves(8).unwrap(), ["0-3".to_string(), "4-7".to_string()]);
        assert!(cpu_halves(1).unwrap_err().contains("at least 2 CPUs"));
    }
}
