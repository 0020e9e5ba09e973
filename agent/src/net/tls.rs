//! TLS 1.3 with mutual authentication and pinned ed25519 identities (rustls, ring provider).
//! spec: SPEC.md §5.3
//!
//! There is no CA: each side accepts exactly the identity keys it was told to trust, and the
//! TLS 1.3 CertificateVerify signature proves possession of that key. The exporter
//! (`EXPORTER-trustmig-v1`) binds the protocol's quotes and keys to this TLS session.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use trustmig_protocol::order::hex;
use trustmig_protocol::AgentId;

use crate::identity::{cert_identity, Identity};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(msg: String) -> rustls::Error {
    rustls::Error::General(msg)
}

fn verify13(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(tls_error(format!(
            "signature scheme {:?} refused; ed25519 only",
            dss.scheme
        )));
    }
    verify_tls13_signature(
        message,
        cert,
        dss,
        &provider().signature_verification_algorithms,
    )
}

/// Accepts exactly one server identity: the destination the order names.
#[derive(Debug)]
pub struct PinnedServer {
    expected: AgentId,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = cert_identity(end_entity).map_err(tls_error)?;
        if id != self.expected {
            return Err(tls_error(format!(
                "peer identity {} is not the destination the order names ({})",
                hex(&id),
                hex(&self.expected)
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls_error("TLS 1.2 refused".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Accepts client identities from the trust store.
#[derive(Debug)]
pub struct PinnedClients {
    trusted: Vec<AgentId>,
}

impl ClientCertVerifier for PinnedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let id = cert_identity(end_entity).map_err(tls_error)?;
        if !self.trusted.contains(&id) {
            return Err(tls_error(format!(
                "peer identity {} is not in trust/peers.toml",
                hex(&id)
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _m: &[u8],
        _c: &CertificateDer<'_>,
        _d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls_error("TLS 1.2 refused".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// Server (destination) configuration: TLS 1.3 only, client certificates mandatory and pinned.
pub fn server_config(
    me: &Identity,
    trusted_peers: Vec<AgentId>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(PinnedClients {
            trusted: trusted_peers,
        }))
        .with_cert_resolver(me.tls_key());
    Ok(Arc::new(cfg))
}

/// Client (source) configuration: TLS 1.3 only, the server pinned to `expected`.
pub fn client_config(
    me: &Identity,
    expected: AgentId,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { expected }))
        .with_client_cert_resolver(me.tls_key());
    Ok(Arc::new(cfg))
}

/// The session's exporter value, wiped when dropped (session secret material). spec: SPEC.md
/// §5.3
pub fn exporter<D>(
    conn: &rustls::ConnectionCommon<D>,
) -> Result<zeroize::Zeroizing<[u8; 32]>, rustls::Error> {
    let mut out = zeroize::Zeroizing::new([0u8; 32]);
    conn.export_keying_material(&mut *out, trustmig_protocol::keys::TLS_EXPORTER_LABEL, None)?;
    Ok(out)
}

/// The authenticated peer's identity after the handshake.
pub fn peer_identity<D>(conn: &rustls::ConnectionCommon<D>) -> Result<AgentId, String> {
    let certs = conn
        .peer_certificates()
        .ok_or("peer presented no certificate")?;
    let first = certs.first().ok_or("peer presented no certificate")?;
    cert_identity(first)
}

/// Dial `addr` and run TLS 1.3 pinned to the identity `peer`, within `timeout` for each of the
/// TCP connect and the handshake. The source's channel and `trustmig doctor` use it.
pub async fn dial(
    me: &Identity,
    addr: &str,
    peer: AgentId,
    timeout: std::time::Duration,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, crate::error::AgentError> {
    let cerr = |reason: String| crate::error::AgentError::Connect {
        addr: addr.to_string(),
        reason,
    };
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| cerr("timed out".into()))?
        .map_err(|e| cerr(e.to_string()))?;
    tcp.set_nodelay(true).ok();
    let cfg = client_config(me, peer)
        .map_err(|e| crate::error::AgentError::Tls(format!("TLS configuration: {e}")))?;
    let name = ServerName::try_from("trustmig-agent").expect("static name is valid");
    tokio::time::timeout(
        timeout,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .map_err(|_| cerr("TLS handshake timed out".into()))?
    .map_err(|e| cerr(handshake_failure(&e)))
}

/// Why a TLS handshake failed, for the operator. A peer that refuses us in TLS says why in an
/// alert (rustls reports it, as `InvalidData`); a connection closed with no alert before the
/// handshake ends is most often an agent that turned it away unread (its connection limits
/// full, `daemon::admission`), else one that gave up on it or restarted, or no trustmig agent.
fn handshake_failure(e: &std::io::Error) -> String {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    if matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    ) {
        format!(
            "the peer closed the connection during the TLS handshake, with no TLS alert ({e}): \
             it turned the connection away unread (its connection limits are full: try again \
             later), it closed it mid-handshake (its handshake timeout, a restart), or it is no \
             trustmig agent"
        )
    } else {
        format!("TLS handshake: {e}")
    }
}
