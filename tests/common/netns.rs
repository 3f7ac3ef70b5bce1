//! Hosts as network namespaces: each has its own address (on its loopback) and a veth link to
//! every other, so one pair's link can be cut (a blackhole route at both ends) while every
//! other pair still talks. The test process reaches the first namespace (the coordinator's)
//! over one more link. Needs root and `ip netns`.
#![allow(dead_code)]

use std::process::Command;

/// The namespaces, deleted (with their links) when dropped.
pub struct Net {
    tag: String,
    pub names: Vec<String>,
    /// Each namespace's own address, by which the others reach it.
    pub addrs: Vec<String>,
    /// The first namespace's address as the test process reaches it.
    pub front: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// `n` namespaces, fully linked; an error when this machine cannot make them (not root,
    /// no `ip`).
    pub fn new(n: usize) -> Result<Net, String> {
        let tag = format!("k{}", std::process::id() % 100_000);
        let mut net = Net {
            tag: tag.clone(),
            names: Vec::new(),
            addrs: Vec::new(),
            front: "10.232.0.2".into(),
        };
        for i in 0..n {
            let name = format!("{tag}h{i}");
            ip(&["netns", "add", &name])?;
            net.names.push(name.clone());
            let addr = format!("10.231.0.{}", i + 1);
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{addr}/32"),
                "dev",
                "lo",
            ])?;
            net.addrs.push(addr);
        }
        for a in 0..n {
            for b in a + 1..n {
                let (va, vb) = (format!("{tag}v{a}-{b}"), format!("{tag}v{b}-{a}"));
                ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
                for (v, ns, src, dst) in [
                    (&va, &net.names[a], &net.addrs[a], &net.addrs[b]),
                    (&vb, &net.names[b], &net.addrs[b], &net.addrs[a]),
                ] {
                    ip(&["link", "set", v, "netns", ns])?;
                    ip(&["-n", ns, "link", "set", v, "up"])?;
                    ip(&[
                        "-n",
                        ns,
                        "route",
                        "add",
                        &format!("{dst}/32"),
                        "dev",
                        v,
                        "src",
                        src,
                    ])?;
                }
            }
        }
        // The test process's own link to the first namespace.
        let (here, there) = (format!("{tag}f0"), format!("{tag}f1"));
        ip(&["link", "add", &here, "type", "veth", "peer", "name", &there])?;
        ip(&["link", "set", &there, "netns", &net.names[0]])?;
        ip(&["addr", "add", "10.232.0.1/30", "dev", &here])?;
        ip(&["link", "set", &here, "up"])?;
        ip(&[
            "-n",
            &net.names[0],
            "addr",
            "add",
            "10.232.0.2/30",
            "dev",
            &there,
        ])?;
        ip(&["-n", &net.names[0], "link", "set", &there, "up"])?;
        Ok(net)
    }

    /// Cuts the link between namespaces `a` and `b`: neither reaches the other.
    pub fn cut(&self, a: usize, b: usize) {
        self.route_both(a, b, |_, y| vec!["blackhole".into(), self.host(y)]);
    }

    /// Restores the link between `a` and `b`.
    pub fn restore(&self, a: usize, b: usize) {
        self.route_both(a, b, |x, y| {
            vec![
                self.host(y),
                "dev".into(),
                format!("{}v{x}-{y}", self.tag),
                "src".into(),
                self.addrs[x].clone(),
            ]
        });
    }

    fn host(&self, i: usize) -> String {
        format!("{}/32", self.addrs[i])
    }

    /// `ip route replace ROUTE` in `a` with `route(a, b)` and in `b` with `route(b, a)`.
    fn route_both(&self, a: usize, b: usize, route: impl Fn(usize, usize) -> Vec<String>) {
        for (x, y) in [(a, b), (b, a)] {
            let route = route(x, y);
            let mut args = vec!["-n", self.names[x].as_str(), "route", "replace"];
            args.extend(route.iter().map(String::as_str));
            ip(&args).unwrap();
        }
    }

    /// `ip netns exec NAME` before a command, to run it in namespace `i`.
    pub fn exec(&self, i: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[i]]);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = ip(&["netns", "del", name]);
        }
        // The test process's end of its link goes with its peer.
    }
}
