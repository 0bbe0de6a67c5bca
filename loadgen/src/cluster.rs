//! The system under test as the load generator sees it: one server (its Control
//! service) and the agents (their AgentControl services), with the functions each agent
//! hosts. Works the same for embedded and remote processes.

use anyhow::{Context as _, bail};
use dmar_proto::v1::agent_control_client::AgentControlClient;
use dmar_proto::v1::control_client::ControlClient;
use dmar_proto::v1::{GetAgentInfoRequest, GetPlatformRequest, GetStatsRequest, Platform, Stats};
use tonic::transport::Channel;

use crate::security::{ClientSecurity, Peer};

/// One agent and its functions.
#[derive(Debug, Clone)]
pub(crate) struct AgentHandle {
    /// Control endpoint.
    pub(crate) endpoint: String,
    /// Client.
    pub(crate) client: AgentControlClient<Channel>,
    /// Requester ids of its ATS functions.
    pub(crate) functions: Vec<u32>,
}

/// The server and the agents.
#[derive(Debug, Clone)]
pub(crate) struct Cluster {
    /// The server's Control service.
    pub(crate) control: ControlClient<Channel>,
    /// The agents, in a stable order.
    pub(crate) agents: Vec<AgentHandle>,
}

/// A function chosen for a run: which agent hosts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Device {
    /// Index into [`Cluster::agents`].
    pub(crate) agent: usize,
    /// Requester id.
    pub(crate) sid: u32,
}

async fn connect(security: &ClientSecurity, addr: &str, peer: Peer) -> anyhow::Result<Channel> {
    let endpoint = security.endpoint(addr, peer)?;
    endpoint.connect().await.with_context(|| format!("cannot reach {addr}"))
}

/// Expands agent addresses: `host:port` names that resolve to several addresses (a
/// scaled compose service) become one agent each.
pub(crate) async fn expand_agents(addrs: &[String]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for a in addrs {
        let bare = a.split("://").last().unwrap_or(a);
        let mut resolved: Vec<String> = tokio::net::lookup_host(bare)
            .await
            .with_context(|| format!("cannot resolve agent address {a:?}"))?
            .map(|sa| sa.to_string())
            .collect();
        resolved.sort();
        resolved.dedup();
        if resolved.is_empty() {
            bail!("agent address {a:?} resolves to nothing");
        }
        out.extend(resolved);
    }
    Ok(out)
}

impl Cluster {
    /// Connects to the server and every agent and asks the agents for their functions.
    /// Under TLS every channel presents the client's certificate; the server's must carry
    /// the server name and each agent's the agent name, whatever address is dialled.
    pub(crate) async fn connect(security: &ClientSecurity, server: &str, agents: &[String]) -> anyhow::Result<Cluster> {
        if agents.is_empty() {
            bail!("no agents given (use --agents host:port,...)");
        }
        for a in agents {
            // A scheme contradicting the security is an error before names are resolved
            // (resolving drops it).
            security.url(a)?;
        }
        let control = ControlClient::new(connect(security, server, Peer::Server).await?);
        let mut handles = Vec::new();
        for a in expand_agents(agents).await? {
            let mut client = AgentControlClient::new(connect(security, &a, Peer::Agent).await?);
            let info = client
                .get_agent_info(GetAgentInfoRequest {})
                .await
                .with_context(|| format!("agent {a} does not answer GetAgentInfo"))?
                .into_inner();
            let functions = info.functions.iter().filter(|f| f.ats).map(|f| f.source_id).collect();
            handles.push(AgentHandle { endpoint: a, client, functions });
        }
        Ok(Cluster { control, agents: handles })
    }

    /// Every ATS function, spread over the agents round-robin (so `n` devices use as many
    /// agents as they can).
    pub(crate) fn devices(&self) -> Vec<Device> {
        let mut out = Vec::new();
        let longest = self.agents.iter().map(|a| a.functions.len()).max().unwrap_or(0);
        for i in 0..longest {
            for (agent, a) in self.agents.iter().enumerate() {
                if let Some(&sid) = a.functions.get(i) {
                    out.push(Device { agent, sid });
                }
            }
        }
        out
    }

    /// The server's counters.
    pub(crate) async fn stats(&self) -> anyhow::Result<Stats> {
        Ok(self.control.clone().get_stats(GetStatsRequest {}).await.context("server GetStats")?.into_inner())
    }

    /// The server's platform: its remapping units and their device scopes.
    pub(crate) async fn platform(&self) -> anyhow::Result<Platform> {
        Ok(self.control.clone().get_platform(GetPlatformRequest {}).await.context("server GetPlatform")?.into_inner())
    }

    /// Every ATS function's requester id, in [`Cluster::devices`] order.
    pub(crate) fn device_sids(&self) -> Vec<dmar_vtd::SourceId> {
        self.devices().iter().map(|d| dmar_vtd::SourceId(d.sid as u16)).collect()
    }
}
