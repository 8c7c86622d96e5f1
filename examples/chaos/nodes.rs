//! Nodes: started here, so a kill -9 is ours and a node that died on its own is seen.

use crate::*;

pub(crate) struct Nodes {
    pub(crate) spec: Spec,
    pub(crate) children: HashMap<String, Child>,
    /// Nodes that exited without being killed by us: (id, exit status).
    pub(crate) died: Vec<(String, String)>,
}

impl Nodes {
    pub(crate) fn start(&mut self, id: &str) -> Result<()> {
        let n = self.spec.nodes.iter().find(|n| n.id == id).context("no such node")?;
        let log_path = self.spec.run_dir.join(format!("{id}.log"));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new(&self.spec.bin)
            .arg("run")
            .arg("--config")
            .arg(&n.config)
            .arg("--node")
            .arg(id)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.spec.bin.display()))?;
        std::fs::write(self.spec.run_dir.join(format!("{id}.pid")), format!("{}\n", child.id()))?;
        self.children.insert(id.to_string(), child);
        Ok(())
    }

    pub(crate) fn kill9(&mut self, id: &str) {
        self.check();
        if let Some(mut c) = self.children.remove(id) {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Notes every node that exited on its own.
    pub(crate) fn check(&mut self) {
        let mut gone = Vec::new();
        for (id, c) in self.children.iter_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                gone.push((id.clone(), st.to_string()));
            }
        }
        for (id, st) in gone {
            self.children.remove(&id);
            eprintln!("[chaos] node {id} exited on its own: {st}");
            self.died.push((id, st));
        }
    }
}
