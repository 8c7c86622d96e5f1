//! Cluster-link proxies: their own thread and runtime, so the driver's crypto never delays them.

use crate::*;

pub(crate) struct Proxies {
    /// (from, to) -> open?
    pub(crate) switches: HashMap<(String, String), tokio::sync::watch::Sender<bool>>,
}

impl Proxies {
    pub(crate) fn start(specs: &[ProxySpec]) -> Result<Proxies> {
        let mut switches = HashMap::new();
        let mut listeners = Vec::new();
        for p in specs {
            let l = std::net::TcpListener::bind(p.listen).with_context(|| format!("proxy bind {}", p.listen))?;
            l.set_nonblocking(true)?;
            let (tx, rx) = tokio::sync::watch::channel(true);
            switches.insert((p.from.clone(), p.to.clone()), tx);
            listeners.push((l, p.target, rx));
        }
        std::thread::Builder::new().name("proxies".into()).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, target, rx) in listeners {
                    let l = tokio::net::TcpListener::from_std(l).expect("proxy listener");
                    tasks.push(tokio::spawn(proxy_loop(l, target, rx)));
                }
                for t in tasks {
                    let _ = t.await;
                }
            });
        })?;
        Ok(Proxies { switches })
    }

    /// Opens or cuts every link of `node` (both directions, with every peer).
    pub(crate) fn set_node(&self, node: &str, open: bool) {
        for ((from, to), tx) in &self.switches {
            if from == node || to == node {
                tx.send_replace(open);
            }
        }
    }
}

pub(crate) async fn proxy_loop(l: tokio::net::TcpListener, target: SocketAddr, rx: tokio::sync::watch::Receiver<bool>) {
    loop {
        let Ok((mut inbound, _)) = l.accept().await else {
            continue;
        };
        if !*rx.borrow() {
            drop(inbound); // cut: refused at once
            continue;
        }
        let mut rx = rx.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = rx.wait_for(|open| !*open) => {} // cut: both sides see the connection end
            }
        });
    }
}
