//! Raw protocol peers: play an agent by hand over TLS, for tests that replay captured orders,
//! impersonate agents or send any first message.

use trustmig_agent::home::Home;
use trustmig_agent::AgentError;
use trustmig_protocol::order::SignedOrder;
use trustmig_protocol::AgentId;

/// Play a source by hand: TLS as the identity in `as_home` to `addr` (pinned to `dst_id`),
/// send a `ClientHello` carrying `order`, and return the destination's first answer. For tests
/// that replay captured orders or impersonate agents.
pub async fn raw_hello(
    as_home: &Home,
    addr: &str,
    dst_id: AgentId,
    order: &SignedOrder,
) -> Result<trustmig_protocol::messages::Message, AgentError> {
    use trustmig_protocol::messages::{ClientHello, Message, TransferMode};
    let hello = Message::ClientHello(ClientHello {
        versions: trustmig_protocol::SUPPORTED_VERSIONS.to_vec(),
        nonce: trustmig_agent::random(),
        order: order.clone(),
        mode: TransferMode::Precopy {
            page_size: 4096,
            page_count: 1024,
        },
        streams: 1,
    });
    raw_request(as_home, addr, dst_id, &hello).await
}

/// Play any agent by hand: TLS as the identity in `as_home` to `addr` (pinned to `dst_id`),
/// send `msg` as the first frame and return the first answer.
pub async fn raw_request(
    as_home: &Home,
    addr: &str,
    dst_id: AgentId,
    msg: &trustmig_protocol::messages::Message,
) -> Result<trustmig_protocol::messages::Message, AgentError> {
    use trustmig_protocol::messages::Message;
    let me = trustmig_agent::identity::Identity::load(as_home)?;
    let cfg = trustmig_agent::net::tls::client_config(&me, dst_id)
        .map_err(|e| AgentError::Migration(e.to_string()))?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(AgentError::io(addr))?;
    let name =
        rustls::pki_types::ServerName::try_from("trustmig-agent").expect("static name is valid");
    let mut tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| AgentError::Connect {
            addr: addr.into(),
            reason: format!("TLS handshake: {e}"),
        })?;
    trustmig_agent::net::wire::write_frame(&mut tls, &msg.encode())
        .await
        .map_err(|e| AgentError::Migration(e.to_string()))?;
    let reply = trustmig_agent::net::wire::read_frame(&mut tls)
        .await
        .map_err(|e| AgentError::Migration(e.to_string()))?;
    Message::decode(&reply).map_err(|e| AgentError::Migration(e.to_string()))
}
