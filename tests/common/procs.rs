//! Popek processes for the migration tests: a VM or destination running in the
//! background with its output in files, and two "hosts" made of network namespaces.

use super::{popek_bin, Scratch};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Proc {
    pub child: Child,
    pub out: PathBuf,
    pub err: PathBuf,
}

impl Proc {
    pub fn spawn(scratch: &Scratch, tag: &str, args: &[&str]) -> Proc {
        Proc::spawn_in(scratch, tag, &[], args)
    }

    /// `popek ARGS` run through `prefix` (e.g. `ip netns exec NAME`); output in files.
    pub fn spawn_in(scratch: &Scratch, tag: &str, prefix: &[&str], args: &[&str]) -> Proc {
        let out = scratch.0.join(format!("{tag}.out"));
        let err = scratch.0.join(format!("{tag}.err"));
        let mut command: Vec<&str> = prefix.to_vec();
        command.push(popek_bin());
        command.extend_from_slice(args);
        let child = Command::new(command[0])
            .args(&command[1..])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Proc { child, out, err }
    }

    pub fn wait(mut self) -> (i32, String, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("process did not end:\n{}", std::fs::read_to_string(&self.out).unwrap_or_default());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        (status, std::fs::read_to_string(&self.out).unwrap(), std::fs::read_to_string(&self.err).unwrap())
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits until a destination listens.
    pub fn listening(&self) {
        wait_for("the destination to listen", || {
            std::fs::read_to_string(&self.err).unwrap_or_default().contains("waiting for a migration on")
        });
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a source VM (control socket `src.sock`, `extra` run arguments) running the
/// migrate workload `cmdline`, and waits until the workload has stamped its pages.
pub fn workload(scratch: &Scratch, extra: &[&str], cmdline: &str) -> (Proc, String) {
    let api = scratch.0.join("src.sock").display().to_string();
    let mut args = vec!["run", "--no-stdin", "--api-socket", &api];
    args.extend_from_slice(extra);
    args.extend(["--cmdline", cmdline]);
    let src = Proc::spawn(scratch, "src", &args);
    wait_for("the source workload", || src.stdout().contains("migrate: ready"));
    (src, api)
}

/// A destination listening on `dst.sock` in the scratch directory; returns its address.
pub fn destination(scratch: &Scratch) -> (Proc, String) {
    let addr = format!("unix:{}", scratch.0.join("dst.sock").display());
    let dst = Proc::spawn(scratch, "dst", &["run", "--no-stdin", "--incoming", &addr]);
    dst.listening();
    (dst, addr)
}

/// Two "hosts": network namespaces joined by a veth pair, 198.18.0.1 and 198.18.0.2 (the
/// benchmarking range), removed on drop. Needs root (or passwordless sudo).
pub struct Hosts {
    pub names: [String; 2],
}

pub fn root_prefix() -> Vec<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        vec![]
    } else {
        vec!["sudo", "-n"]
    }
}

pub fn ip(args: &[&str]) {
    let mut command: Vec<&str> = root_prefix();
    command.push("ip");
    command.extend_from_slice(args);
    let status = Command::new(command[0]).args(&command[1..]).status().expect("run ip (iproute2)");
    assert!(status.success(), "ip {args:?} failed: network namespaces need root");
}

impl Hosts {
    pub fn new() -> Hosts {
        let id = std::process::id() % 100_000;
        let names = [format!("popek{id}a"), format!("popek{id}b")];
        let veth = [format!("pv{id}a"), format!("pv{id}b")];
        for n in &names {
            ip(&["netns", "add", n]);
        }
        ip(&["link", "add", &veth[0], "type", "veth", "peer", "name", &veth[1]]);
        for (i, n) in names.iter().enumerate() {
            ip(&["link", "set", &veth[i], "netns", n]);
            let addr = format!("198.18.0.{}/30", i + 1);
            ip(&["-n", n, "addr", "add", &addr, "dev", &veth[i]]);
            ip(&["-n", n, "link", "set", &veth[i], "up"]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        Hosts { names }
    }

    /// Shapes both ends of the link to `rate` (tc's token bucket, e.g. "200mbit").
    pub fn shape(&self, rate: &str) {
        let id = std::process::id() % 100_000;
        for (i, n) in self.names.iter().enumerate() {
            let dev = format!("pv{id}{}", ['a', 'b'][i]);
            let mut command: Vec<&str> = root_prefix();
            command.extend(["ip", "netns", "exec", n, "tc", "qdisc", "add", "dev", &dev, "root", "tbf", "rate", rate]);
            command.extend(["burst", "64kb", "latency", "100ms"]);
            let status = Command::new(command[0]).args(&command[1..]).status().expect("run tc (iproute2)");
            assert!(status.success(), "tc failed on {dev}");
        }
    }

    /// `popek ARGS` inside host `i`.
    pub fn popek(&self, scratch: &Scratch, i: usize, tag: &str, args: &[&str]) -> Proc {
        let mut prefix: Vec<&str> = root_prefix();
        prefix.extend(["ip", "netns", "exec", &self.names[i]]);
        Proc::spawn_in(scratch, tag, &prefix, args)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for n in &self.names {
            let mut command: Vec<&str> = root_prefix();
            command.extend(["ip", "netns", "del", n]);
            let _ = Command::new(command[0]).args(&command[1..]).status();
        }
    }
}

/// A free TCP port on loopback (bound and released: good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A TCP relay between a migration source and its destination that the test can cut,
/// like a broken network link: both sides see their connection end while both processes
/// live on. Later connections are relayed again (the recovery).
pub struct Proxy {
    pub port: u16,
    live: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    pub connections: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Proxy {
    pub fn start(target: String) -> Proxy {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (l, n) = (live.clone(), connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                // The destination may be between listeners (re-binding after a cut).
                let deadline = Instant::now() + Duration::from_secs(5);
                let server = loop {
                    match std::net::TcpStream::connect(&target) {
                        Ok(s) => break Some(s),
                        Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                        Err(_) => break None,
                    }
                };
                let Some(server) = server else { continue };
                n.fetch_add(1, SeqCst);
                l.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, live, connections }
    }

    /// Breaks every relayed connection.
    pub fn cut(&self) {
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}
