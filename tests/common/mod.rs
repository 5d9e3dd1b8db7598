//! What several test files share.
// Each test binary that includes this module uses some of it.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use bessie::config::ModelConfig;
use bessie::model::hf::Layout;
use bessie::model::init::{write_random_checkpoint, TokenizerSource};
use bessie::train::model::{shard_abs_sums, shard_step_weights, StepWeights};
use bessie::train::optim::shards;
use bessie::train::params::ParamLayout;
use candle_core::{DType, Tensor};

/// Writes a random tiny checkpoint (f32 safetensors, the shipped tokenizer) to `dir`.
pub fn tiny_checkpoint(dir: &Path, seed: u64) -> ModelConfig {
    write_random_checkpoint(dir, "tiny", TokenizerSource::Shipped, None, seed, DType::F32, Layout::Safetensors).unwrap()
}

/// A flat buffer of an embedding, a norm and an MLP's up and down matrices of `h` by `i`: BitLinear matrices,
/// a norm and a cast slot, for the flat-buffer kernels.
pub fn mlp_layout(h: usize, i: usize) -> ParamLayout {
    ParamLayout::from_shapes(vec![
        ("model.embed_tokens.weight".into(), vec![i / 3 + 1, h]),
        ("model.layers.0.input_layernorm.weight".into(), vec![h]),
        ("model.layers.0.mlp.up_proj.weight".into(), vec![i, h]),
        ("model.layers.0.mlp.ffn_layernorm.weight".into(), vec![i]),
        ("model.layers.0.mlp.down_proj.weight".into(), vec![h, i]),
    ])
}

/// ZeRO-1's step weights of `flat` as `world` ranks build them: each shard written with its matrices' absmean
/// sums added up over the shards, the shards put together.
pub fn sharded_step_weights(
    layout: &ParamLayout,
    flat: &Tensor,
    world: usize,
    lambda: f64,
    dtype: DType,
) -> StepWeights {
    let shards = shards(layout.total, world);
    let sums = shards
        .iter()
        .map(|s| shard_abs_sums(layout, flat, s.clone(), dtype).unwrap())
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    let parts: Vec<Tensor> = shards
        .iter()
        .map(|s| {
            shard_step_weights(layout, flat, s.clone(), &sums, lambda, dtype)
                .unwrap()
                .0
                .narrow(0, s.start, s.len())
                .unwrap()
        })
        .collect();
    StepWeights::from_flat(Tensor::cat(&parts, 0).unwrap(), None).unwrap()
}

/// A pickle op by op, as torch.save writes them.
#[derive(Default)]
pub struct Pickle(pub Vec<u8>);

impl Pickle {
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.raw(s.as_bytes())
    }
    pub fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.raw(format!("c{module}\n{name}\n").as_bytes())
    }
    /// BINPUT `i`.
    pub fn put(&mut self, i: u8) -> &mut Self {
        self.raw(&[b'q', i])
    }
    pub fn get(&mut self, i: u8) -> &mut Self {
        self.raw(&[b'h', i])
    }
    pub fn int(&mut self, v: u32) -> &mut Self {
        self.raw(b"J").raw(&v.to_le_bytes())
    }
}

/// What torch 2.x's `torch.save(state_dict)` writes for `{"w": [[1, 2, 3], [4, 5, 6]], "wt": w.t()}`: both
/// views of storage 0, `wt` with strides (1, 3); the memo reuses globals and strings; the OrderedDict's
/// `_metadata` comes last through BUILD. `storage` and `size` may be changed for the malformed variants.
pub fn state_dict_pickle(storage: &str, size: [u32; 2]) -> Vec<u8> {
    let mut p = Pickle::default();
    p.raw(&[0x80, 2]).global("collections", "OrderedDict").put(0).raw(b")R").put(1).raw(b"(");
    p.str("w").put(2).global("torch._utils", "_rebuild_tensor_v2").put(3).raw(b"((");
    p.str("storage").put(4).global("torch", storage).put(5).str("0").put(6).str("cpu").put(7).int(6).raw(b"t").put(8);
    p.raw(b"Q").int(0).int(size[0]).int(size[1]).raw(&[0x86]).put(9).int(3).int(1).raw(&[0x86]).put(10);
    p.raw(&[0x89]).get(0).raw(b")R").put(11).raw(b"t").put(12).raw(b"R").put(13);
    p.str("wt").put(14).get(3).raw(b"((").get(4).get(5).get(6).get(7).int(6).raw(b"t").put(15).raw(b"Q");
    p.int(0).int(3).int(2).raw(&[0x86]).int(1).int(3).raw(&[0x86, 0x89]).get(0).raw(b")Rt").raw(b"R").put(16);
    p.raw(b"u}").put(17).str("_metadata").get(0).raw(b")R").put(18).str("").raw(b"}").str("version");
    p.raw(b"K\x01sssb.");
    p.0
}

/// A torch.save zip archive holding `pickle` and storage 0.
pub fn torch_zip(pickle: &[u8], storage: &[u8]) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in [
        ("archive/data.pkl", pickle),
        ("archive/.format_version", b"1"),
        ("archive/.storage_alignment", b"64"),
        ("archive/byteorder", b"little"),
        ("archive/data/0", storage),
        ("archive/version", b"3\n"),
        ("archive/.data/serialization_id", b"1234567890"),
    ] {
        zip.start_file(name, opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

pub fn six_floats() -> Vec<u8> {
    [1f32, 2., 3., 4., 5., 6.].iter().flat_map(|v| v.to_le_bytes()).collect()
}
