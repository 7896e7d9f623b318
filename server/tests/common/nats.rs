//! A NATS JetStream cluster of real `nats-server` processes on loopback, for cluster mode's
//! tests: `sync_interval: always`, as cluster mode requires of its engine.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::DEADLINE;

/// The pinned NATS server `scripts/deps` installs (or `MISSIVE_NATS_SERVER`).
pub fn nats_server() -> PathBuf {
    if let Some(p) = std::env::var_os("MISSIVE_NATS_SERVER") {
        return p.into();
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.deps/nats-server-2.15.1/bin/nats-server");
    assert!(p.exists(), "{} is missing: run scripts/deps (or set MISSIVE_NATS_SERVER)", p.display());
    p
}

fn free_port(ip: std::net::Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port()
}

pub struct NatsNode {
    pub name: String,
    pub port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    /// A loopback address of this cluster's own, so that clusters of tests running at
    /// once can never take each other's ports, nor route to each other.
    ip: std::net::Ipv4Addr,
}

impl NatsCluster {
    /// `n` nodes routed to each other, their stores under `dir`; returns once JetStream
    /// takes a stream of `n` replicas.
    pub async fn start(dir: &Path, n: usize) -> NatsCluster {
        std::fs::create_dir_all(dir).unwrap();
        let ip = std::net::Ipv4Addr::new(127, rand::random::<u8>().max(1), rand::random::<u8>().max(1), rand::random::<u8>().max(2));
        let name = format!("missive-test-{:08x}", rand::random::<u32>());
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(ip), free_port(ip))).collect();
        let routes: Vec<String> = ports.iter().map(|(_, r)| format!("nats-route://{ip}:{r}")).collect();
        let mut nodes = Vec::new();
        for (i, (port, route)) in ports.iter().enumerate() {
            let node = format!("nats-{}", i + 1);
            let store = dir.join(&node);
            let config = dir.join(format!("{node}.conf"));
            std::fs::write(
                &config,
                format!(
                    "server_name: {node}\nlisten: {ip}:{port}\njetstream {{ store_dir: {store:?}, sync_interval: always }}\ncluster {{ name: {name}, listen: {ip}:{route}, routes: [{}] }}\n",
                    routes.join(", ")
                ),
            )
            .unwrap();
            let mut node = NatsNode { name: node, port: *port, config, log: dir.join(format!("nats-{}.log", i + 1)), child: None };
            node.spawn();
            nodes.push(node);
        }
        let cluster = NatsCluster { nodes, ip };
        cluster.wait_for_jetstream(n).await;
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("nats://{}:{}", self.ip, n.port)).collect()
    }

    /// The `[cluster]` section of a `missived` node of this cluster.
    pub fn section(&self, node: &str) -> String {
        let urls: Vec<String> = self.urls().iter().map(|u| format!("{u:?}")).collect();
        format!("\n[cluster]\nengine = \"nats\"\nurls = [{}]\nnode = \"{node}\"\nreplicas = {}\n", urls.join(", "), self.nodes.len())
    }

    async fn wait_for_jetstream(&self, replicas: usize) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let probe = async {
                let client = async_nats::connect(self.urls()[0].as_str()).await.ok()?;
                let js = async_nats::jetstream::new(client);
                let config = async_nats::jetstream::stream::Config { name: "probe".into(), num_replicas: replicas, ..Default::default() };
                js.get_or_create_stream(config).await.ok()?;
                js.delete_stream("probe").await.ok()
            };
            if tokio::time::timeout(Duration::from_secs(5), probe).await.ok().flatten().is_some() {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "JetStream did not come up: {}", self.nodes[0].log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl NatsNode {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(nats_server())
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }

    /// Starts the node again on its store and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} still runs", self.name);
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}
