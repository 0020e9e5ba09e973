//! Handshake with test-double attesters: success, and each attack ending in a typed abort.

mod common;

use common::*;
use trustmig_protocol::error::{AbortCode, Error, PeerMisbehaved};
use trustmig_protocol::handshake::*;
use trustmig_protocol::manifest::ImageManifest;
use trustmig_protocol::messages::{ClientHello, Message, ServerHello};
use trustmig_protocol::order::*;
use trustmig_protocol::testing::{SoftAttester, SoftVerifier};

#[test]
fn handshake_agrees_on_keys_and_claims() {
    let (s, d) = run(Setup::default(), &mut MemoryJournal::default()).unwrap();
    assert_eq!(s.transcript_hash, d.transcript_hash);
    assert_eq!(s.keys.session_id(), d.keys.session_id());
    assert_eq!(
        s.peer_claims.measurements[0],
        trustmig_protocol::attestation::Measurement::AgentExecutable(EXE)
    );
    assert!(
        d.peer_claims.image_manifest().is_some(),
        "source attested its manifest"
    );
    assert_eq!(d.manifest, manifest());
    assert_eq!(s.version, 1);
}

#[test]
fn channel_binding_mismatch_fails_attestation() {
    // A relay that terminates TLS on both sides sees two different exporters.
    let r = run(
        Setup {
            dst_exporter: [6; 32],
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(&r, Err(Failed::Destination(Error::Attestation(a))) if a.to_string().contains("qualifying data")),
        "{r:?}"
    );
}

#[test]
fn replayed_evidence_with_old_nonce_fails() {
    // Capture the source evidence of one session and splice it into a second.
    let captured = std::rc::Rc::new(std::cell::RefCell::new(None));
    let c = captured.clone();
    run(
        Setup {
            tamper_s2d: Box::new(move |i, m| {
                if i == 1 {
                    *c.borrow_mut() = Some(m.clone());
                }
                m
            }),
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    )
    .unwrap();
    let old = captured.borrow().clone().unwrap();
    let r = run(
        Setup {
            signed: SignedOrder::sign(&order_body(1), &op()),
            tamper_s2d: Box::new(move |i, m| if i == 1 { old.clone() } else { m }),
            // A new session that differs in the destination's fresh nonce alone (the same
            // channel binding): only the nonce can tell the old evidence from new.
            dst_nonce: [0xBC; 32],
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(&r, Err(Failed::Destination(Error::Attestation(a))) if a.to_string().contains("qualifying data")),
        "{r:?}"
    );
}

#[test]
fn order_for_another_destination_is_refused() {
    let mut b = order_body(1);
    b.destination = [3; 32];
    let r = run(
        Setup {
            signed: SignedOrder::sign(&b, &op()),
            src_sees_peer: [3; 32],
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    match r {
        Err(Failed::Destination(e @ Error::Order(OrderError::WrongAgent { .. }))) => {
            assert_eq!(AbortCode::from(&e), AbortCode::OrderRefused)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn tls_peer_not_named_in_order_is_refused() {
    // Destination: the TLS client is some other agent than the order's source.
    let r = run(
        Setup {
            dst_sees_peer: [7; 32],
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(
            r,
            Err(Failed::Destination(Error::PeerMisbehaved(
                PeerMisbehaved::WrongPeer { .. }
            )))
        ),
        "{r:?}"
    );
    // Source: the TLS server is not the order's destination.
    let r = run(
        Setup {
            src_sees_peer: [7; 32],
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(
            r,
            Err(Failed::Source(Error::PeerMisbehaved(
                PeerMisbehaved::WrongPeer { .. }
            )))
        ),
        "{r:?}"
    );
}

#[test]
fn replayed_order_is_refused_by_the_journal() {
    let mut journal = MemoryJournal::default();
    run(Setup::default(), &mut journal).unwrap();
    let r = run(Setup::default(), &mut journal);
    assert!(
        matches!(
            r,
            Err(Failed::Destination(Error::Order(OrderError::Replayed(_))))
        ),
        "{r:?}"
    );
}

#[test]
fn unmeasured_agent_fails_attestation_both_ways() {
    let r = run(
        Setup {
            src_exe: [0xEE; 32],
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(&r, Err(Failed::Destination(Error::Attestation(a))) if a.to_string().contains("measurement not allowed")),
        "{r:?}"
    );
    let r = run(
        Setup {
            dst_exe: [0xEE; 32],
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(&r, Err(Failed::Source(Error::Attestation(a))) if a.to_string().contains("measurement not allowed")),
        "{r:?}"
    );
}

fn rewrite(m: Vec<u8>, f: impl FnOnce(Message) -> Message) -> Vec<u8> {
    f(Message::decode(&m).unwrap()).encode()
}

/// A tamperer that rewrites the `n`th message of its direction with `f` and passes the rest.
fn rewrite_nth(
    n: usize,
    f: impl Fn(Message) -> Message + 'static,
) -> Box<dyn FnMut(usize, Vec<u8>) -> Vec<u8>> {
    Box::new(move |i, m| if i == n { rewrite(m, &f) } else { m })
}

#[test]
fn version_downgrade_is_detected() {
    let r = run(
        Setup {
            tamper_d2s: rewrite_nth(0, |msg| match msg {
                Message::ServerHello(sh) => Message::ServerHello(ServerHello {
                    version: 0,
                    versions: vec![1, 0],
                    ..sh
                }),
                o => o,
            }),
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    match r {
        Err(Failed::Source(
            e @ Error::PeerMisbehaved(PeerMisbehaved::Downgrade { chosen: 0, best: 1 }),
        )) => {
            assert_eq!(AbortCode::from(&e), AbortCode::VersionMismatch)
        }
        other => panic!("{other:?}"),
    }
    let r = run(
        Setup {
            tamper_s2d: rewrite_nth(0, |msg| match msg {
                Message::ClientHello(mut ch) => {
                    // Many versions, none spoken here: the refusal names the first 16.
                    ch.versions = (7..1007).collect();
                    Message::ClientHello(ch)
                }
                o => o,
            }),
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    match r {
        Err(Failed::Destination(Error::PeerMisbehaved(PeerMisbehaved::NoCommonVersion(v)))) => {
            assert_eq!(v, (7..23).collect::<Vec<u16>>())
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn altered_finished_or_manifest_is_refused() {
    let r = run(
        Setup {
            tamper_d2s: rewrite_nth(2, |msg| match msg {
                Message::Finished { mut mac } => {
                    mac[0] ^= 1;
                    Message::Finished { mac }
                }
                o => o,
            }),
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(
            r,
            Err(Failed::Source(Error::PeerMisbehaved(
                PeerMisbehaved::BadFinished
            )))
        ),
        "{r:?}"
    );
    let r = run(
        Setup {
            tamper_s2d: rewrite_nth(1, |msg| match msg {
                Message::SourceEvidence {
                    evidence,
                    final_key,
                    ..
                } => Message::SourceEvidence {
                    evidence,
                    final_key,
                    manifest: ImageManifest {
                        vm: "other".into(),
                        ..manifest()
                    }
                    .to_cbor(),
                },
                o => o,
            }),
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(
            r,
            Err(Failed::Destination(Error::PeerMisbehaved(
                PeerMisbehaved::ManifestMismatch
            )))
        ),
        "{r:?}"
    );
}

/// An attacker on the path swaps the source's final-signature key for its own: the source's
/// quote vouches for the key through its qualifying data, so the destination refuses.
#[test]
fn a_substituted_final_key_is_refused() {
    let r = run(
        Setup {
            tamper_s2d: rewrite_nth(1, |msg| match msg {
                Message::SourceEvidence {
                    evidence, manifest, ..
                } => Message::SourceEvidence {
                    evidence,
                    manifest,
                    final_key: trustmig_protocol::finalsig::FinalKey::from_seed(&[0x66; 32])
                        .public(),
                },
                o => o,
            }),
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(&r, Err(Failed::Destination(Error::Attestation(a))) if a.to_string().contains("qualifying data")),
        "{r:?}"
    );
}

#[test]
fn out_of_order_and_garbage_messages_are_typed_and_sticky() {
    let mut dst = DestinationHandshake::new(
        DestinationConfig {
            operators: vec![],
            now: NOW,
        },
        ChannelBinding {
            tls_exporter: [0; 32],
            local: DST,
            peer: SRC,
        },
        [0; 32],
    );
    let mut att = SoftAttester::new(b"k", DST, EXE);
    let ver = SoftVerifier {
        key: b"k".to_vec(),
        allowed_exe: vec![EXE],
    };
    let mut j = MemoryJournal::default();
    let e = dst
        .handle(&Message::Ready.encode(), &mut att, &ver, &mut j)
        .unwrap_err();
    assert!(matches!(
        e,
        Error::PeerMisbehaved(PeerMisbehaved::UnexpectedMessage { got: "ready", .. })
    ));
    assert_eq!(
        dst.handle(&Message::Ready.encode(), &mut att, &ver, &mut j)
            .unwrap_err(),
        e
    );
    let mut dst2 = DestinationHandshake::new(
        DestinationConfig {
            operators: vec![],
            now: NOW,
        },
        ChannelBinding {
            tls_exporter: [0; 32],
            local: DST,
            peer: SRC,
        },
        [0; 32],
    );
    let e = dst2
        .handle(b"\xff\x00garbage", &mut att, &ver, &mut j)
        .unwrap_err();
    assert_eq!(AbortCode::from(&e), AbortCode::DecodeError);
}

/// The destination's quote covers nothing that arrives with `SourceEvidence` (SPEC.md §5.2,
/// D11): its qualifying data is known once the hello is accepted, so the agent quotes then,
/// beside the source; what it quotes early is exactly what the handshake sends.
#[test]
fn the_destination_may_quote_as_soon_as_it_accepts_the_hello() {
    use trustmig_protocol::attestation::{AttestationError, Attester, Measurement};
    /// The destination's TPM, noting what it was asked to quote.
    struct Noting(SoftAttester, Vec<[u8; 32]>);
    impl Attester for Noting {
        fn extend(&mut self, m: &Measurement) -> Result<(), AttestationError> {
            self.0.extend(m)
        }
        fn quote(&mut self, qd: &[u8; 32]) -> Result<Vec<u8>, AttestationError> {
            self.1.push(*qd);
            self.0.quote(qd)
        }
    }
    let s = Setup::default();
    let policy = OrderPolicy {
        operators: &[op().verifying_key().to_bytes()],
        me: SRC,
        role: Role::Source,
        now: NOW,
    };
    let mode = trustmig_protocol::messages::TransferMode::Precopy {
        page_size: 4096,
        page_count: 256,
    };
    let channel = |exporter, local, peer| ChannelBinding {
        tls_exporter: exporter,
        local,
        peer,
    };
    let (mut src, hello) = SourceHandshake::start(
        s.signed.verify(&policy).unwrap(),
        channel(s.src_exporter, SRC, DST),
        ([0xAA; 32], &[0xAB; 32]),
        mode,
        2,
        &manifest(),
    )
    .unwrap();
    let config = DestinationConfig {
        operators: vec![op().verifying_key().to_bytes()],
        now: NOW,
    };
    let mut dst = DestinationHandshake::new(config, channel(s.dst_exporter, DST, SRC), [0xBB; 32]);
    let mut src_att = SoftAttester::new(b"k", SRC, EXE);
    let mut dst_att = Noting(SoftAttester::new(b"k", DST, EXE), Vec::new());
    let ver = SoftVerifier {
        key: b"k".to_vec(),
        allowed_exe: vec![EXE],
    };
    let mut journal = MemoryJournal::default();
    assert_eq!(dst.evidence_qualifying_data(), None, "before the hello");
    let server_hello = dst
        .handle(&hello, &mut dst_att, &ver, &mut journal)
        .unwrap();
    let early = dst
        .evidence_qualifying_data()
        .expect("known once the hello is accepted");
    assert!(dst_att.1.is_empty(), "nothing quoted by the protocol yet");
    let mut to_dst = Vec::new();
    for m in server_hello {
        to_dst.extend(src.handle(&m, &mut src_att, &ver).unwrap());
    }
    while !(src.is_done() && dst.is_done()) {
        let mut to_src = Vec::new();
        for m in to_dst.drain(..) {
            to_src.extend(dst.handle(&m, &mut dst_att, &ver, &mut journal).unwrap());
        }
        for m in to_src {
            to_dst.extend(src.handle(&m, &mut src_att, &ver).unwrap());
        }
    }
    assert_eq!(dst_att.1, [early], "the quote sent is the one known early");
    assert_eq!(dst.evidence_qualifying_data(), None, "after the handshake");
}

/// The channel's exporter is wiped when its binding is dropped (each clone too), and its
/// `Debug` leaves it out: with the transcript hash, which the journal keeps in clear, it gives
/// every stream key of the session. (A compile-time check: removing the wipe fails to build.)
#[test]
fn the_channel_binding_is_wiped_and_never_printed() {
    fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    wiped_on_drop::<ChannelBinding>();
    let mut b = ChannelBinding {
        tls_exporter: [0xA5; 32],
        local: [1; 32],
        peer: [2; 32],
    };
    let shown = format!("{b:?}");
    // Neither as hex nor as the bytes a derived `Debug` prints, nor named.
    assert!(
        !shown.contains(&"a5".repeat(4))
            && !shown.contains("165")
            && !shown.contains("tls_exporter"),
        "{shown}"
    );
    zeroize::Zeroize::zeroize(&mut b);
    assert_eq!(b.tls_exporter, [0; 32]);
}

/// SPEC.md §5: a hello altered in a way every check of its own accepts (here the number of
/// data streams, within bounds) still breaks key confirmation: both transcripts cover it.
#[test]
fn a_hello_altered_within_its_rules_breaks_key_confirmation() {
    let r = run(
        Setup {
            tamper_s2d: rewrite_nth(0, |msg| match msg {
                Message::ClientHello(ch) => Message::ClientHello(ClientHello {
                    streams: ch.streams + 1,
                    ..ch
                }),
                o => o,
            }),
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(
            &r,
            Err(
                Failed::Source(Error::PeerMisbehaved(PeerMisbehaved::BadFinished))
                    | Failed::Destination(Error::PeerMisbehaved(PeerMisbehaved::BadFinished))
            )
        ),
        "{r:?}"
    );
}

/// A source that attests, quotes and sends a manifest of another VM than its order names (a
/// genuine agent's own quote: the manifest root matches) is refused by the destination, which
/// would otherwise take the wrong VM's disks and stream under this order.
#[test]
fn an_attested_manifest_of_another_vm_is_refused() {
    let r = run(
        Setup {
            manifest: ImageManifest {
                vm: "other".into(),
                ..manifest()
            },
            ..Setup::default()
        },
        &mut MemoryJournal::default(),
    );
    assert!(
        matches!(
            &r,
            Err(Failed::Destination(Error::PeerMisbehaved(PeerMisbehaved::BadField(f))))
                if f.contains("manifest is for VM \"other\", the order for \"vm-1\"")
        ),
        "{r:?}"
    );
}
