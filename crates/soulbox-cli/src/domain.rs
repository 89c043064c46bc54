//! Domain mode of `soulbox serve` (issue 8): one TLS listener for `api.<domain>` (the control
//! plane) and `<port>-<sandbox id>.<domain>` (sandbox ports), beside the plain-HTTP URL-mode
//! listeners, which keep working. See docs/domain-mode.md.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use http_body_util::BodyExt;
use soulbox_core::Manager;
use soulbox_gateway::{
    CertificateSource, Certificates, ControlPlane, Gateway, GatewayConfig, Limits,
};
use tokio::net::TcpListener;

/// The domain `--domain` without a value means: resolves to loopback without any DNS set-up
/// wherever `*.localhost` does (RFC 6761; see docs/domain-mode.md for glibc systems).
pub const DEFAULT_DOMAIN: &str = "soulbox.localhost";

#[derive(clap::Args)]
pub struct DomainArgs {
    /// Domain mode: serve `https://api.<DOMAIN>` (control plane) and
    /// `https://<port>-<sandbox id>.<DOMAIN>` (sandbox ports, `get_host`) on --tls-addr, for
    /// every SDK version. Without a value: soulbox.localhost.
    #[arg(long, num_args = 0..=1, default_missing_value = DEFAULT_DOMAIN, value_name = "DOMAIN")]
    pub domain: Option<String>,
    /// TLS listener of domain mode. On another port than 443 the port becomes part of the
    /// domain clients are given (E2B_DOMAIN=<domain>:<port>).
    #[arg(long, default_value = "127.0.0.1:443", value_name = "ADDR")]
    pub tls_addr: SocketAddr,
    /// PEM certificate chain for `*.<domain>` (default: one signed by a local CA kept in
    /// the data dir). Reloaded when the file changes.
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert. Reloaded when the file changes.
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
}

/// Domain mode, set up: the certificate and the bound TLS listener.
pub struct DomainMode {
    pub domain: String,
    /// What clients are told: `<domain>`, or `<domain>:<port>` off port 443.
    pub advertised: String,
    certificates: Arc<Certificates>,
    /// The TLS listener, and its IPv6 twin when it is on 127.0.0.1 (`*.localhost` names
    /// resolve to ::1 first).
    listeners: Vec<TcpListener>,
}

impl DomainArgs {
    /// Checks the flags, loads or makes the certificate and binds the TLS listener; `None`
    /// without `--domain`.
    pub async fn prepare(&self, data: &Path) -> anyhow::Result<Option<DomainMode>> {
        let Some(domain) = &self.domain else {
            if self.tls_cert.is_some() {
                anyhow::bail!("--tls-cert/--tls-key need --domain");
            }
            return Ok(None);
        };
        let domain = soulbox_gateway::validate_domain(domain)?;
        let source = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => CertificateSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => CertificateSource::LocalCa {
                dir: data.join("tls"),
                domain: domain.clone(),
            },
        };
        let certificates = tokio::task::spawn_blocking(move || Certificates::load(source))
            .await
            .context("loading the TLS certificate")?
            .context("loading the TLS certificate")?;
        let listener = TcpListener::bind(self.tls_addr)
            .await
            .with_context(|| format!("binding the TLS listener to {}", self.tls_addr))?;
        let port = listener.local_addr()?.port();
        let mut listeners = vec![listener];
        if self.tls_addr.ip() == std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST) {
            match TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, port)).await {
                Ok(v6) => listeners.push(v6),
                Err(e) => tracing::debug!(error = %e, "no TLS listener on [::1]:{port}"),
            }
        }
        let advertised = if port == 443 {
            domain.clone()
        } else {
            format!("{domain}:{port}")
        };
        warn_unless_resolvable(&domain).await;
        Ok(Some(DomainMode {
            domain,
            advertised,
            certificates,
            listeners,
        }))
    }
}

impl DomainMode {
    /// The shell lines that point clients at domain mode (printed after the URL-mode ones).
    pub fn exports(&self) -> String {
        let mut out = format!(
            "# domain mode (every SDK version, get_host): https://api.{0} and https://<port>-<sandbox id>.{0}\n\
             export E2B_DOMAIN={0}\n",
            self.advertised
        );
        if let Some(ca) = self.certificates.local_ca() {
            out.push_str(&format!(
                "# trust SoulBox's local CA for {}: Python (system CAs + this one), Node (added to its own)\n\
                 export SSL_CERT_FILE={}\n\
                 export NODE_EXTRA_CA_CERTS={}\n",
                self.domain,
                ca.bundle.display(),
                ca.cert.display()
            ));
        }
        out
    }

    /// Serves TLS until `shutdown` resolves, reloading or renewing the certificate meanwhile.
    pub async fn serve<F>(self, gateway: Gateway, shutdown: impl Fn() -> F) -> anyhow::Result<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let config = self.certificates.server_config()?;
        let refresher = tokio::spawn(self.certificates.clone().keep_fresh());
        let mut served = tokio::task::JoinSet::new();
        for listener in self.listeners {
            let (gateway, config, stop) = (gateway.clone(), config.clone(), shutdown());
            served.spawn(async move { gateway.serve_tls(listener, config, stop).await });
        }
        let mut result = Ok(());
        while let Some(done) = served.join_next().await {
            if let Err(e) = done.context("TLS listener task").and_then(|r| Ok(r?)) {
                result = Err(e);
            }
        }
        refresher.abort();
        result
    }
}

/// The gateway's settings: limits sized to this process's descriptors, and in domain mode the
/// domain and the control plane for `api.<domain>`.
pub fn gateway_config(mode: Option<&DomainMode>, manager: &Manager) -> GatewayConfig {
    let mut limits = Limits::default();
    let fds = raise_nofile_limit();
    // One descriptor per client connection and per tunnel, plus what the server needs.
    limits.max_connections = limits.max_connections.min(fds / 4 * 3).max(64);
    limits.max_tunnels = limits.max_tunnels.min(fds / 4).max(16);
    let Some(mode) = mode else {
        return GatewayConfig {
            limits,
            ..GatewayConfig::default()
        };
    };
    let router = soulbox_api::router(manager.clone());
    let control_plane: ControlPlane = Arc::new(move |req| {
        let router = router.clone();
        Box::pin(async move {
            let response = match tower::ServiceExt::oneshot(router, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            response.map(|body| body.map_err(Into::into).boxed_unsync())
        })
    });
    GatewayConfig {
        limits,
        domain: Some(mode.domain.clone()),
        control_plane: Some(control_plane),
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard one (many client connections); returns it.
fn raise_nofile_limit() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let limit = if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        hard
    } else {
        soft
    };
    usize::try_from(limit).unwrap_or(usize::MAX)
}

/// Warns when `api.<domain>` does not resolve here: clients on this machine could not reach
/// domain mode.
async fn warn_unless_resolvable(domain: &str) {
    let name = format!("api.{domain}");
    if tokio::net::lookup_host((name.as_str(), 443))
        .await
        .is_ok_and(|mut addrs| addrs.next().is_some())
    {
        return;
    }
    if domain.ends_with(".localhost") || domain == "localhost" {
        tracing::warn!(
            "{name} does not resolve on this machine: glibc needs the myhostname NSS module for \
             *.localhost names (apt-get install libnss-myhostname, then add `myhostname` to the \
             hosts: line of /etc/nsswitch.conf; scripts/localhost-dns does both)"
        );
    } else {
        tracing::warn!(
            "{name} does not resolve on this machine: point api.{domain} and *.{domain} at this \
             server (wildcard DNS, e.g. dnsmasq address=/{domain}/<ip>)"
        );
    }
}
