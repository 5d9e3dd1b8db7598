//! Writing `pytorch_model.bin`: the zip archive `torch.save` makes, with a protocol-2 pickle of an
//! `OrderedDict` of tensors rebuilt by `torch._utils._rebuild_tensor_v2` from raw little-endian storages.
//! Enough for transformers and candle to read a state dict; Bessie itself prefers safetensors.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use zip::write::SimpleFileOptions;

#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) -> &mut Self {
        self.0.push(op);
        self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.0.push(b'c');
        self.0.extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn int(&mut self, v: usize) -> &mut Self {
        self.0.push(b'J'); // BININT
        self.0.extend_from_slice(&(v as i32).to_le_bytes());
        self
    }
    fn int_tuple(&mut self, vs: &[usize]) -> &mut Self {
        self.op(b'(');
        vs.iter().for_each(|&v| {
            self.int(v);
        });
        self.op(b't')
    }
    fn empty_ordered_dict(&mut self) -> &mut Self {
        self.global("collections", "OrderedDict").op(b')').op(b'R')
    }
}

const MARK: u8 = b'(';
const TUPLE: u8 = b't';
const REDUCE: u8 = b'R';

pub fn write(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut p = Pickle::default();
    p.op(0x80).op(2); // PROTO 2
    p.empty_ordered_dict().op(MARK);
    for (i, (name, t)) in tensors.iter().enumerate() {
        let storage = match t.dtype() {
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            other => bail!("cannot write {other:?} tensor `{name}` to a PyTorch file"),
        };
        let dims = t.dims();
        let strides: Vec<usize> = (0..dims.len()).map(|d| dims[d + 1..].iter().product()).collect();
        p.str(name).global("torch._utils", "_rebuild_tensor_v2").op(MARK);
        p.op(MARK).str("storage").global("torch", storage).str(&i.to_string()).str("cpu");
        p.int(t.elem_count()).op(TUPLE).op(b'Q'); // BINPERSID: the storage record above
        p.int(0).int_tuple(dims).int_tuple(&strides).op(0x89); // offset, size, stride, requires_grad=False
        p.empty_ordered_dict().op(TUPLE).op(REDUCE); // backward hooks; call _rebuild_tensor_v2
    }
    p.op(b'u').op(b'.'); // SETITEMS, STOP

    let mut zip = zip::ZipWriter::new(std::fs::File::create(path)?);
    let opts = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts)?;
    zip.write_all(&p.0)?;
    zip.start_file("archive/byteorder", opts)?;
    zip.write_all(b"little")?;
    for (i, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts)?;
        zip.write_all(&tensor_bytes(&t.flatten_all()?)?)?;
    }
    zip.start_file("archive/version", opts)?;
    zip.write_all(b"3\n")?;
    zip.finish()?;
    Ok(())
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => bail!("cannot write {other:?} to a PyTorch file"),
    })
}
