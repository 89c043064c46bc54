//! Sandbox networking in the manager: every sandbox of a server with networking
//! ([`crate::ManagerConfig::network`]) runs in a leased network slot (see `soulbox-net`), keyed
//! by its id, whatever its egress policy: `allow_internet_access=false` is a policy (deny
//! all), so `PUT /sandboxes/{id}/network` can turn access on later. Without networking,
//! sandboxes keep the runtime's loopback-only namespace.
//!
//! What sandboxed code can do with this: nothing more than its slot's policy lets it (the
//! policy lives on the host, in nftables and the resolver; see docs/networking.md).

use soulbox_net::{EgressConfig, NetError};
use soulbox_runtime::{NetworkAttach, RuntimeError, SandboxHandle, SandboxSpec};

use crate::{CoreError, Manager};

impl From<NetError> for CoreError {
    fn from(e: NetError) -> CoreError {
        match e {
            NetError::Policy(p) => CoreError::InvalidArgument(p.to_string()),
            NetError::NotFound(id) => CoreError::NotFound(id),
            NetError::Exhausted(_) => CoreError::Capacity(e.to_string()),
            e => CoreError::Internal(format!("network: {e}")),
        }
    }
}

impl Manager {
    /// The server's network service, if it has one.
    pub fn network(&self) -> Option<&soulbox_net::Network> {
        self.inner.cfg.network.as_ref()
    }

    /// Leases a network slot to `owner` with `config` and returns what the runtime needs to
    /// run a sandbox in it (`None` when the server has no networking). For sandboxes made
    /// outside [`Manager::create`] (template builds); pair with [`Manager::release_network`]
    /// once the sandbox is destroyed.
    pub async fn attach_network(
        &self,
        owner: &str,
        config: &EgressConfig,
    ) -> Result<Option<NetworkAttach>, CoreError> {
        let Some(net) = self.network() else {
            return Ok(None);
        };
        let lease = net.acquire(owner, config).await?;
        let Some(netns) = lease.netns.clone() else {
            net.release(owner).await?;
            return Err(CoreError::Internal(
                "a new network lease has no namespace".into(),
            ));
        };
        Ok(Some(NetworkAttach {
            netns,
            resolv_conf: lease.resolv_conf(),
        }))
    }

    /// Ends `owner`'s network lease (idempotent; a no-op without networking). Failures are
    /// logged: the slot is then not reused, nothing else is affected.
    pub async fn release_network(&self, owner: &str) {
        if let Some(net) = self.network()
            && let Err(e) = net.release(owner).await
        {
            tracing::error!(%owner, error = %e, "releasing a network slot");
        }
    }

    /// Runtime create in a network slot leased to the sandbox (when the server has
    /// networking); a failure leaves no lease behind.
    pub(crate) async fn create_in_network(
        &self,
        spec: &SandboxSpec,
        config: &EgressConfig,
    ) -> Result<SandboxHandle, CoreError> {
        let attach = self.attach_network(&spec.id, config).await?;
        let runtime_error = |e: RuntimeError| match e {
            RuntimeError::NoUidRange => CoreError::Capacity(e.to_string()),
            e => CoreError::Runtime(e),
        };
        match self.inner.runtime.create_with_network(spec, attach).await {
            Ok(h) => Ok(h),
            Err(e) => {
                self.release_network(&spec.id).await;
                Err(runtime_error(e))
            }
        }
    }

    /// `PUT /sandboxes/{id}/network`: replaces the sandbox's whole egress configuration,
    /// live.
    pub async fn update_network(&self, id: &str, config: &EgressConfig) -> Result<(), CoreError> {
        soulbox_net::Policy::compile(config)
            .map_err(|e| CoreError::InvalidArgument(e.to_string()))?;
        if self.route(id).is_none() {
            return Err(CoreError::NotFound(id.to_owned()));
        }
        let Some(net) = self.network() else {
            return Err(CoreError::InvalidArgument(
                "this server runs sandboxes without networking (serve --network off)".into(),
            ));
        };
        Ok(net.update(id, config).await?)
    }

    /// The sandbox's egress configuration as last set (`None` without networking).
    pub fn network_config(&self, id: &str) -> Option<EgressConfig> {
        self.network()?.config(id)
    }
}
