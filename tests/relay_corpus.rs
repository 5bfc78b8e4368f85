//! The relay filter's contract (`fuzz/relay_check.rs`), replayed on the
//! saved fuzz corpus and on generated frame streams, so CI keeps every
//! input that once broke it fixed.

use proptest::prelude::*;

#[path = "../fuzz/relay_check.rs"]
mod relay_check;

#[test]
fn the_saved_corpus_still_passes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/relay_frames");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| relay_check::check(&data));
        assert!(r.is_ok(), "corpus input {} breaks the relay", path.display());
        n += 1;
    }
    assert!(n >= 10, "the corpus is missing ({n} inputs in {})", dir.display());
}

/// One frame, mostly well-formed: the fields are drawn so that both valid
/// and invalid frames are common.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<bool>(),
        prop_oneof![4 => Just(0u8), 1 => 0u8..8],
        prop_oneof![3 => 0u8..3, 2 => 8u8..11, 1 => 0u8..16],
        any::<bool>(),
        prop_oneof![6 => 0usize..130, 1 => 130usize..70_000],
        any::<[u8; 4]>(),
    )
        .prop_map(|(fin, rsv, opcode, masked, len, mask)| {
            let mut f = vec![if fin { 0x80 } else { 0 } | rsv << 4 | opcode];
            let m = if masked { 0x80 } else { 0 };
            if len < 126 {
                f.push(m | len as u8);
            } else if len <= 0xFFFF {
                f.push(m | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                f.push(m | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
            if masked {
                f.extend_from_slice(&mask);
            }
            f.extend((0..len).map(|i| i as u8));
            f
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn generated_streams_keep_the_contract(
        flags in any::<u8>(),
        seed in any::<u8>(),
        frames in prop::collection::vec(frame(), 0..12),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut data = vec![flags, seed];
        for f in &frames {
            data.extend_from_slice(f);
        }
        // Sometimes the stream ends mid-frame.
        let keep = 2 + cut.index(data.len() - 1);
        if flags & 0x80 != 0 {
            data.truncate(keep.max(2));
        }
        relay_check::check(&data);
    }

    #[test]
    fn arbitrary_bytes_keep_the_contract(data in prop::collection::vec(any::<u8>(), 0..600)) {
        relay_check::check(&data);
    }
}
