//! `model::bitnet_packed` against transformers' own `pack_weights` / `unpack_weights` (fixture written by
//! tests/reference/bitnet_pack.py).

use bessie::model::bitnet_packed::{pack, packed_rows, unpack};

#[derive(serde::Deserialize)]
struct Case {
    out: usize,
    cols: usize,
    values: Vec<i8>,
    packed: Vec<u8>,
    unpacked: Vec<i8>,
}

#[test]
fn packing_matches_transformers() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bitnet_pack.json");
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases: Vec<Case> = serde_json::from_value(fixture["cases"].clone()).unwrap();
    assert!(cases.iter().any(|c| c.out % 4 != 0) && cases.iter().any(|c| c.out % 4 == 0));
    for c in &cases {
        let what = format!("{} x {}", c.out, c.cols);
        assert_eq!(c.packed.len(), packed_rows(c.out) * c.cols, "{what}");
        assert_eq!(pack(&c.values, c.out, c.cols).unwrap(), c.packed, "{what}");
        let values = unpack(&c.packed, c.out, c.cols).unwrap();
        assert_eq!(values, c.values, "{what}");
        // transformers unpacks every packed row's four blocks: Bessie's rows, then the padding's code 0.
        let (rows, padding) = c.unpacked.split_at(c.out * c.cols);
        assert_eq!(rows, values, "{what}");
        assert!(padding.iter().all(|&v| v == -1), "{what}");
    }
}
