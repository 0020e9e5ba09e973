//! Record layer under attack: flipped bits, replay, reorder, drop, truncation, limits.

use proptest::prelude::*;
use trustmig_protocol::keys::TrafficSecret;
use trustmig_protocol::record::*;

fn secret() -> TrafficSecret {
    TrafficSecret::dangerous_from_bytes([0x42; 32], [0x24; 12])
}

fn sealed(n: usize) -> Vec<Vec<u8>> {
    let mut s = Sealer::new(secret(), 3);
    (0..n)
        .map(|i| {
            let mut out = Vec::new();
            s.seal(
                RecordType::Pages,
                format!("payload {i}").as_bytes(),
                &mut out,
            )
            .unwrap();
            out
        })
        .collect()
}

#[test]
fn round_trip() {
    let mut o = Opener::new(secret(), 3);
    for (i, mut r) in sealed(5).into_iter().enumerate() {
        let (t, p) = o.open(&mut r).unwrap();
        assert_eq!(t, RecordType::Pages);
        assert_eq!(p, format!("payload {i}").as_bytes());
    }
}

#[test]
fn every_flipped_bit_is_rejected_and_fatal() {
    let recs = sealed(2);
    for bit in 0..recs[0].len() * 8 {
        let mut o = Opener::new(secret(), 3);
        let mut r = recs[0].clone();
        r[bit / 8] ^= 1 << (bit % 8);
        assert!(o.open(&mut r).is_err(), "bit {bit} accepted");
        // Fatal: even the genuine record is refused afterwards.
        let mut good = recs[0].clone();
        assert!(o.open(&mut good).is_err(), "session survived bit {bit}");
    }
}

#[test]
fn replay_reorder_drop_truncate() {
    let recs = sealed(3);
    let mut o = Opener::new(secret(), 3);
    o.open(&mut recs[0].clone()).unwrap();
    assert_eq!(
        o.open(&mut recs[0].clone()),
        Err(RecordError::Replayed {
            got: 0,
            expected: 1
        })
    );

    let mut o = Opener::new(secret(), 3);
    assert_eq!(
        o.open(&mut recs[1].clone()),
        Err(RecordError::Gap {
            got: 1,
            expected: 0
        })
    );

    let mut o = Opener::new(secret(), 3);
    o.open(&mut recs[0].clone()).unwrap();
    assert_eq!(
        o.open(&mut recs[2].clone()),
        Err(RecordError::Gap {
            got: 2,
            expected: 1
        }),
        "dropped record"
    );

    let mut o = Opener::new(secret(), 3);
    let mut t = recs[0].clone();
    t.truncate(t.len() - 1);
    assert!(matches!(
        o.open(&mut t),
        Err(RecordError::LengthMismatch { .. })
    ));

    let mut o = Opener::new(secret(), 4);
    assert_eq!(
        o.open(&mut recs[0].clone()),
        Err(RecordError::WrongStream {
            got: 3,
            expected: 4
        })
    );
}

#[test]
fn a_rejected_record_changes_nothing_but_is_sticky() {
    let recs = sealed(2);
    let mut o = Opener::new(secret(), 3);
    o.open(&mut recs[0].clone()).unwrap();
    let mut bad = recs[1].clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(o.open(&mut bad), Err(RecordError::BadTag { seq: 1 }));
    assert_eq!(o.records(), 1, "counter did not advance");
    assert_eq!(
        o.open(&mut recs[1].clone()),
        Err(RecordError::BadTag { seq: 1 })
    );
}

/// The bulk path seals in the caller's buffer; its records are `seal`'s, byte for byte, key
/// updates (handed back to go first) and the hard limit included, and a buffer without room
/// for the header is refused.
#[test]
fn seal_in_place_makes_the_records_seal_makes() {
    let limits = SequenceLimits {
        rekey_interval: 4,
        hard_limit: 12,
    };
    let mut by_copy = Sealer::with_limits(secret(), 5, limits);
    let mut in_place = Sealer::with_limits(secret(), 5, limits);
    for i in 0..12u32 {
        let payload = format!("payload number {i}").repeat(i as usize);
        let mut expected = Vec::new();
        let copied = by_copy.seal(
            RecordType::HypervisorStream,
            payload.as_bytes(),
            &mut expected,
        );
        let mut record = [&[0xee; HEADER_LEN][..], payload.as_bytes()].concat();
        let mut before = Vec::new();
        let placed = in_place.seal_in_place(RecordType::HypervisorStream, &mut record, &mut before);
        assert_eq!(placed, copied, "record {i}");
        if placed.is_ok() {
            assert_eq!([before, record].concat(), expected, "record {i}");
        } else {
            assert!(before.is_empty(), "nothing is written when refused");
        }
    }
    let mut short = vec![0; HEADER_LEN - 1];
    assert!(matches!(
        in_place.seal_in_place(RecordType::HypervisorStream, &mut short, &mut Vec::new()),
        Err(RecordError::LengthMismatch { .. })
    ));
    let mut big = vec![0; HEADER_LEN + MAX_PAYLOAD + 1];
    assert_eq!(
        Sealer::new(secret(), 0).seal_in_place(RecordType::Pages, &mut big, &mut Vec::new()),
        Err(RecordError::PayloadTooLarge(MAX_PAYLOAD + 1))
    );
}

#[test]
fn rekey_and_hard_limit() {
    let limits = SequenceLimits {
        rekey_interval: 4,
        hard_limit: 12,
    };
    let mut s = Sealer::with_limits(secret(), 0, limits);
    let mut o = Opener::with_limits(secret(), 0, limits);
    let mut data = 0;
    let mut updates = 0;
    loop {
        let mut out = Vec::new();
        match s.seal(RecordType::Pages, b"x", &mut out) {
            Ok(()) => {}
            Err(e) => {
                assert_eq!(e, RecordError::Exhausted(11));
                break;
            }
        }
        let mut rest = &mut out[..];
        while !rest.is_empty() {
            let h = Header::parse(rest[..HEADER_LEN].try_into().unwrap()).unwrap();
            let (rec, tail) = rest.split_at_mut(HEADER_LEN + h.len as usize);
            match o.open(rec).unwrap().0 {
                RecordType::KeyUpdate => updates += 1,
                RecordType::Pages => data += 1,
                t => panic!("unexpected {t:?}"),
            }
            rest = tail;
        }
    }
    assert_eq!(updates, 2, "a key update every 4 records");
    assert_eq!(
        data + updates,
        11,
        "the update at 11 and its record would pass the limit of 12"
    );
    // After a key update, a record under the old key (right sequence number) is refused.
    let mut rekeying = Sealer::with_limits(secret(), 0, limits);
    let mut stale = Sealer::with_limits(
        secret(),
        0,
        SequenceLimits {
            rekey_interval: 1 << 40,
            hard_limit: 1 << 40,
        },
    );
    let mut o = Opener::with_limits(secret(), 0, limits);
    let mut wire = Vec::new();
    for _ in 0..3 {
        rekeying.seal(RecordType::Pages, b"y", &mut wire).unwrap();
    }
    let mut stale_recs = Vec::new();
    for _ in 0..5 {
        let mut r = Vec::new();
        stale.seal(RecordType::Pages, b"y", &mut r).unwrap();
        stale_recs.push(r);
    }
    // Open 0, 1, 2 (data) from the wire, then the update the rekeying sealer sends at seq 3.
    let mut ku = Vec::new();
    rekeying.seal(RecordType::Pages, b"y", &mut ku).unwrap();
    wire.extend_from_slice(&ku);
    let mut rest = &mut wire[..];
    for _ in 0..4 {
        let h = Header::parse(rest[..HEADER_LEN].try_into().unwrap()).unwrap();
        let (rec, tail) = rest.split_at_mut(HEADER_LEN + h.len as usize);
        o.open(rec).unwrap();
        rest = tail;
    }
    assert_eq!(
        o.open(&mut stale_recs[4]),
        Err(RecordError::BadTag { seq: 4 })
    );
}

#[test]
fn after_stream_end_nothing_is_accepted() {
    let mut s = Sealer::new(secret(), 0);
    let mut o = Opener::new(secret(), 0);
    let mut end = Vec::new();
    s.seal(RecordType::StreamEnd, &0u64.to_be_bytes(), &mut end)
        .unwrap();
    assert_eq!(
        s.seal(RecordType::Pages, b"late", &mut Vec::new()),
        Err(RecordError::AfterEnd)
    );
    o.open(&mut end).unwrap();
    assert!(o.is_ended());
    // A forged continuation (valid seq 1 under the right key) is still refused.
    let mut s2 = Sealer::new(secret(), 0);
    let mut two = Vec::new();
    s2.seal(RecordType::Pages, b"a", &mut two).unwrap();
    two.clear();
    s2.seal(RecordType::Pages, b"b", &mut two).unwrap();
    assert_eq!(o.open(&mut two), Err(RecordError::AfterEnd));
}

#[test]
fn oversize_is_refused_both_ways() {
    let mut s = Sealer::new(secret(), 0);
    let big = vec![0u8; MAX_PAYLOAD + 1];
    assert_eq!(
        s.seal(RecordType::Pages, &big, &mut Vec::new()),
        Err(RecordError::PayloadTooLarge(MAX_PAYLOAD + 1))
    );
    let mut h = [0u8; HEADER_LEN];
    h[0] = RECORD_VERSION;
    h[12..16].copy_from_slice(&((MAX_CIPHERTEXT + 1) as u32).to_be_bytes());
    assert_eq!(
        Header::parse(&h),
        Err(RecordError::BadLength((MAX_CIPHERTEXT + 1) as u32))
    );
    h[12..16].copy_from_slice(&5u32.to_be_bytes());
    assert_eq!(Header::parse(&h), Err(RecordError::BadLength(5)));
}

proptest! {
    /// Any permutation of a record sequence other than the identity is refused at the first
    /// out-of-place record, and everything before it opens.
    #[test]
    fn only_in_order_delivery_is_accepted(perm in Just((0..6usize).collect::<Vec<_>>()).prop_shuffle()) {
        let recs = sealed(6);
        let mut o = Opener::new(secret(), 3);
        let first_bad = perm.iter().enumerate().position(|(i, &p)| i != p);
        for (i, &p) in perm.iter().enumerate() {
            let mut rec = recs[p].clone();
            let r = o.open(&mut rec).map(|_| ());
            match first_bad {
                Some(b) if i >= b => { prop_assert!(r.is_err()); }
                _ => { prop_assert!(r.is_ok()); }
            }
        }
    }

    /// Random corruption anywhere in a random payload's record is always rejected.
    #[test]
    fn random_corruption_rejected(payload in proptest::collection::vec(any::<u8>(), 0..2000), pos in any::<usize>(), bit in 0u8..8) {
        let mut s = Sealer::new(secret(), 1);
        let mut r = Vec::new();
        s.seal(RecordType::DeviceState, &payload, &mut r).unwrap();
        let i = pos % r.len();
        r[i] ^= 1 << bit;
        let mut o = Opener::new(secret(), 1);
        prop_assert!(o.open(&mut r).is_err());
    }
}
