//! nginx (Debian's package; `scripts/test.sh` installs it) round-robin in front of nodes, as
//! operators run it (`scripts/cluster.sh`): WebSocket upgrade, the next node on 502/503.
//! Started on a free loopback port in a temp dir; killed by its PID when dropped.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    pub addr: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// `upstreams`: the nodes' public `host:port`s.
    pub fn start(upstreams: &[String]) -> Nginx {
        // A port checked free here, then bound by nginx a moment later (it can take a
        // listening socket from its parent, in the `NGINX` variable of its on-the-fly upgrade,
        // but nginx 1.22 without a master process crashes on one). It is drawn from below the
        // ephemeral range, which nothing else takes on its own; should something take it all
        // the same, nginx exits and is started again on another port.
        for _ in 0..5 {
            if let Some(n) = Self::try_start(upstreams) {
                return n;
            }
        }
        panic!("nginx did not start in 5 attempts (see its errors above)");
    }

    /// One attempt: None when nginx exited (its port was taken meanwhile).
    fn try_start(upstreams: &[String]) -> Option<Nginx> {
        let addr = format!("127.0.0.1:{}", super::ports::unclaimed_port());
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let servers: String = upstreams.iter().map(|u| format!("    server {u};\n")).collect();
        let conf = format!(
            "master_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\ndaemon off;\n\
             events {{ worker_connections 1024; }}\nhttp {{\n  access_log off;\n\
             client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n\
             map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
             upstream mailroom {{\n{servers}  }}\n  server {{\n    listen {addr};\n    client_max_body_size 8m;\n\
             location / {{\n      proxy_pass http://mailroom;\n      proxy_http_version 1.1;\n\
             proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $connection_upgrade;\n\
             proxy_set_header Host $host;\n      proxy_read_timeout 1h;\n\
             proxy_next_upstream error timeout http_502 http_503;\n    }}\n  }}\n}}\n"
        );
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx runs (scripts/test.sh installs Debian's nginx-light)");
        // nginx writes its pid file only after it has bound its listening sockets: with it, the
        // port answering is nginx, not whoever took the port after us.
        let pid_file = dir.path().join("nginx.pid");
        let pid = child.id().to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if child.try_wait().unwrap().is_some() {
                return None;
            }
            let bound = std::fs::read_to_string(&pid_file).is_ok_and(|p| p.trim() == pid);
            if bound && std::net::TcpStream::connect(&addr).is_ok() {
                return Some(Nginx { addr, child, _dir: dir });
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nginx did not listen on {addr}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
