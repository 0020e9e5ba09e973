//! Orders: every field altered, forged, expired, replayed, wrong role -> refused.

use ed25519_dalek::SigningKey;
use trustmig_protocol::codec;
use trustmig_protocol::order::*;

const NOW: u64 = 1_800_000_000;

fn body() -> OrderBody {
    OrderBody {
        v: ORDER_VERSION,
        order_id: [0x11; 16],
        vm: "vm-1".into(),
        source: [1; 32],
        destination: [2; 32],
        destination_addr: "127.0.0.1:7443".into(),
        limits: Limits {
            downtime_ms: 300,
            bandwidth_bps: 0,
            max_rounds: 30,
            on_nonconvergence: NonConvergence::Force,
        },
        not_before: NOW - 10,
        not_after: NOW + 600,
        strict_final_quote: false,
    }
}

fn operator() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

fn policy(role: Role, me: [u8; 32], ops: &[[u8; 32]]) -> OrderPolicy<'_> {
    OrderPolicy {
        operators: ops,
        me,
        role,
        now: NOW,
    }
}

#[test]
fn round_trip_verifies_for_both_roles() {
    let op = operator();
    let ops = [op.verifying_key().to_bytes()];
    let signed = SignedOrder::sign(&body(), &op);
    let wire = SignedOrder::from_cbor(&signed.to_cbor()).unwrap();
    let v = wire
        .verify(&policy(Role::Destination, [2; 32], &ops))
        .unwrap();
    assert_eq!(v.body(), &body());
    wire.verify(&policy(Role::Source, [1; 32], &ops)).unwrap();
}

/// Every field changed after signing (a re-encoded body with the old signature) is refused.
#[test]
fn every_altered_field_is_refused() {
    let op = operator();
    let ops = [op.verifying_key().to_bytes()];
    let signed = SignedOrder::sign(&body(), &op);
    type Mutation = Box<dyn Fn(&mut OrderBody)>;
    let mutations: Vec<Mutation> = vec![
        Box::new(|b| b.v = 2),
        Box::new(|b| b.order_id[0] ^= 1),
        Box::new(|b| b.vm.push('x')),
        Box::new(|b| b.source[5] ^= 1),
        Box::new(|b| b.destination[5] ^= 1),
        Box::new(|b| b.destination_addr = "10.0.0.9:7443".into()),
        Box::new(|b| b.limits.downtime_ms += 1),
        Box::new(|b| b.limits.bandwidth_bps = 1),
        Box::new(|b| b.limits.max_rounds += 1),
        Box::new(|b| b.limits.on_nonconvergence = NonConvergence::Abort),
        Box::new(|b| b.not_before -= 1),
        Box::new(|b| b.not_after += 3600),
        Box::new(|b| b.strict_final_quote = !b.strict_final_quote),
    ];
    for (i, m) in mutations.iter().enumerate() {
        let mut b = body();
        m(&mut b);
        let forged = SignedOrder {
            body: codec::encode(&b),
            ..signed.clone()
        };
        assert_eq!(
            forged.verify(&policy(Role::Destination, [2; 32], &ops)),
            Err(OrderError::BadSignature),
            "mutation {i}"
        );
    }
}

#[test]
fn every_flipped_bit_of_the_signed_order_is_refused() {
    let op = operator();
    let ops = [op.verifying_key().to_bytes()];
    let signed = SignedOrder::sign(&body(), &op);
    for i in 0..signed.body.len() * 8 {
        let mut s = signed.clone();
        s.body[i / 8] ^= 1 << (i % 8);
        assert!(
            s.verify(&policy(Role::Destination, [2; 32], &ops)).is_err(),
            "body bit {i}"
        );
    }
    for i in 0..signed.sig.len() * 8 {
        let mut s = signed.clone();
        s.sig[i / 8] ^= 1 << (i % 8);
        assert_eq!(
            s.verify(&policy(Role::Destination, [2; 32], &ops)),
            Err(OrderError::BadSignature),
            "sig bit {i}"
        );
    }
}

#[test]
fn forged_by_unknown_operator_is_refused() {
    let rogue = SigningKey::from_bytes(&[7; 32]);
    let ops = [operator().verifying_key().to_bytes()];
    let signed = SignedOrder::sign(&body(), &rogue);
    assert!(matches!(
        signed.verify(&policy(Role::Destination, [2; 32], &ops)),
        Err(OrderError::UnknownOperator(_))
    ));
    // Claiming a trusted operator key while signing with another: bad signature.
    let claimed = SignedOrder {
        operator: ops[0],
        ..signed
    };
    assert_eq!(
        claimed.verify(&policy(Role::Destination, [2; 32], &ops)),
        Err(OrderError::BadSignature)
    );
}

#[test]
fn window_and_role_checks() {
    let op = operator();
    let ops = [op.verifying_key().to_bytes()];
    let check = |b: OrderBody, role: Role, me: [u8; 32], now: u64| {
        SignedOrder::sign(&b, &op).verify(&OrderPolicy {
            operators: &ops,
            me,
            role,
            now,
        })
    };
    let b = body();
    assert!(matches!(
        check(
            b.clone(),
            Role::Destination,
            [2; 32],
            b.not_after + MAX_CLOCK_SKEW + 1
        ),
        Err(OrderError::Expired { .. })
    ));
    assert!(
        check(
            b.clone(),
            Role::Destination,
            [2; 32],
            b.not_after + MAX_CLOCK_SKEW
        )
        .is_ok(),
        "skew allowance"
    );
    assert!(matches!(
        check(
            b.clone(),
            Role::Destination,
            [2; 32],
            b.not_before - MAX_CLOCK_SKEW - 1
        ),
        Err(OrderError::NotYetValid { .. })
    ));
    assert!(matches!(
        check(b.clone(), Role::Destination, [3; 32], NOW),
        Err(OrderError::WrongAgent { .. })
    ));
    assert!(matches!(
        check(b.clone(), Role::Source, [2; 32], NOW),
        Err(OrderError::WrongAgent { .. })
    ));
    let mut same = b.clone();
    same.destination = same.source;
    assert_eq!(
        check(same, Role::Source, [1; 32], NOW),
        Err(OrderError::SameAgent)
    );
    let mut long = b.clone();
    long.not_after = long.not_before + MAX_ORDER_LIFETIME + 1;
    assert!(matches!(
        check(long, Role::Destination, [2; 32], NOW),
        Err(OrderError::BadWindow(_))
    ));
    let mut empty = b.clone();
    empty.not_after = empty.not_before;
    assert!(matches!(
        check(empty, Role::Destination, [2; 32], NOW),
        Err(OrderError::BadWindow(_))
    ));
    let mut limits = b.clone();
    limits.limits.max_rounds = 0;
    assert!(matches!(
        check(limits, Role::Destination, [2; 32], NOW),
        Err(OrderError::BadLimits(_))
    ));
    let mut v = b;
    v.v = 9;
    assert_eq!(
        check(v, Role::Destination, [2; 32], NOW),
        Err(OrderError::UnsupportedVersion(9))
    );
}

#[test]
fn journal_refuses_replay() {
    let mut j = MemoryJournal::default();
    let mut b = body();
    j.claim(&b, &[0; 32]).unwrap();
    assert!(matches!(
        j.claim(&b, &[0; 32]),
        Err(OrderError::Replayed(_))
    ));
    b.order_id = [2; 16];
    j.claim(&b, &[0; 32]).unwrap();
}

#[test]
fn malformed_orders_are_typed() {
    assert!(matches!(
        SignedOrder::from_cbor(b"\xa0"),
        Err(OrderError::Malformed(_))
    ));
    assert!(matches!(
        SignedOrder::from_cbor(&[]),
        Err(OrderError::Malformed(_))
    ));
    let op = operator();
    let ops = [op.verifying_key().to_bytes()];
    let mut s = SignedOrder::sign(&body(), &op);
    s.body = vec![0; MAX_ORDER_BODY + 1];
    assert_eq!(
        s.verify(&policy(Role::Destination, [2; 32], &ops)),
        Err(OrderError::TooLarge(MAX_ORDER_BODY + 1))
    );
}

/// Signature malleability: the same signature with `S + L` (the group order added: the same
/// point equation, another encoding) is refused, so an order's bytes have one valid signature
/// (ed25519-dalek refuses S ≥ L in plain verification too; this pins it, whichever is used).
#[test]
fn a_signature_with_a_non_canonical_s_is_refused() {
    // L = 2^252 + 27742317777372353535851937790883648493, little-endian.
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let op = operator();
    let ops = [op.verifying_key().to_bytes()];
    let signed = SignedOrder::sign(&body(), &op);
    let mut s = signed.clone();
    let mut carry = 0u16;
    for (byte, l) in s.sig[32..].iter_mut().zip(L) {
        let sum = u16::from(*byte) + u16::from(l) + carry;
        *byte = sum as u8;
        carry = sum >> 8;
    }
    assert_eq!(carry, 0, "S + L fits 256 bits");
    assert_ne!(s.sig, signed.sig);
    assert_eq!(
        s.verify(&policy(Role::Destination, [2; 32], &ops)),
        Err(OrderError::BadSignature)
    );
}

/// A small-order operator key (here the identity point, trusted by mistake) with the
/// signature `R` = identity, `S` = 0 satisfies the plain ed25519 equation for every message:
/// anyone could sign any order with it. Strict verification refuses it.
#[test]
fn a_small_order_operator_key_signs_nothing() {
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let ops = [identity];
    let mut sig = vec![0u8; 64];
    sig[0] = 1;
    let forged = SignedOrder {
        body: codec::encode(&body()),
        operator: identity,
        sig,
    };
    assert_eq!(
        forged.verify(&policy(Role::Destination, [2; 32], &ops)),
        Err(OrderError::BadSignature)
    );
    // The same with plain (non-strict) verification goes through: what the test guards.
    let key = ed25519_dalek::VerifyingKey::from_bytes(&identity).unwrap();
    let sig = ed25519_dalek::Signature::from_slice(&forged.sig).unwrap();
    let input = [ORDER_SIGNING_CONTEXT, &forged.body].concat();
    assert!(
        ed25519_dalek::Verifier::verify(&key, &input, &sig).is_ok(),
        "the weak key's forgery"
    );
}
