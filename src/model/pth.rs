//! `pytorch_model.bin`: the zip archive `torch.save` makes, with a pickle (`archive/data.pkl`) of an
//! `OrderedDict` of tensors rebuilt by `torch._utils._rebuild_tensor_v2` from raw little-endian storages
//! (`archive/data/KEY`). Bessie writes it for tools that want it and reads it; it prefers safetensors.
//!
//! Reading is a restricted pickle machine, not a general unpickler: a downloaded checkpoint is untrusted,
//! and a general unpickler (Python's, or candle's) calls or skips any GLOBAL the file names, copies what the
//! memo shares, recurses as deep as the file nests and trusts the lengths it reads. This one accepts only
//! what `torch.save` writes for a state dict: the opcodes it uses (protocols 2 to 4) and the GLOBALs
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter` and the
//! storage classes, by exact name (any other is an error naming it). Values are shared through the memo,
//! never deep-copied, and nest at most `MAX_DEPTH` deep; every length is checked against the bytes present
//! before anything is allocated; a storage's bytes must be exactly its element count times its dtype's size,
//! every tensor must lie inside its storage (checked arithmetic), and each zip entry's CRC-32 is verified.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::Path;
use std::rc::Rc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
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

/// How deep containers may nest: a state dict is a dict of tensors whose `_metadata` nests a few levels.
const MAX_DEPTH: usize = 32;
/// The largest pickle accepted; a state dict's is about 100 bytes per tensor. The machine's stack and memo
/// hold at most one value (24 bytes) per pickle byte.
const MAX_PICKLE_BYTES: u64 = 16 << 20;

/// The GLOBALs a state dict needs, found by exact module and name.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    Storage(DType),
}

impl Global {
    fn find(module: &str, name: &str) -> Result<Global> {
        Ok(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", "FloatStorage") => Global::Storage(DType::F32),
            ("torch", "HalfStorage") => Global::Storage(DType::F16),
            ("torch", "BFloat16Storage") => Global::Storage(DType::BF16),
            ("torch", "DoubleStorage") => Global::Storage(DType::F64),
            ("torch", "LongStorage") => Global::Storage(DType::I64),
            ("torch", "IntStorage") => Global::Storage(DType::I32),
            ("torch", "ShortStorage") => Global::Storage(DType::I16),
            ("torch", "ByteStorage") => Global::Storage(DType::U8),
            _ => bail!("GLOBAL {module}.{name} is not one torch.save writes for a state dict; refusing the file"),
        })
    }
}

/// A storage as a persistent id names it: its dtype, its key (the entry `data/KEY`) and its element count.
#[derive(Debug, PartialEq)]
struct StorageRef {
    dtype: DType,
    key: String,
    numel: u64,
}

/// A tensor before its data is read: a view of a storage.
#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: u64,
    shape: Vec<usize>,
    strides: Vec<u64>,
}

/// Tuples, lists and dicts (dicts as key, value, key, value...), with how deep they nest.
#[derive(Clone, Debug, Default)]
struct Items {
    values: Vec<Value>,
    depth: usize,
}

#[derive(Clone, Debug)]
enum Value {
    None,
    Bool,
    Int(i64),
    Str(Rc<str>),
    Tuple(Rc<Items>),
    List(Rc<Items>),
    Dict(Rc<Items>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

const _: () = assert!(std::mem::size_of::<Value>() <= 24);

impl Value {
    fn depth(&self) -> usize {
        match self {
            Value::Tuple(i) | Value::List(i) | Value::Dict(i) => i.depth,
            _ => 0,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "a bool",
            Value::Int(_) => "an int",
            Value::Str(_) => "a string",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a GLOBAL",
            Value::Storage(_) => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

fn items(values: Vec<Value>) -> Result<Rc<Items>> {
    let depth = 1 + values.iter().map(Value::depth).max().unwrap_or(0);
    ensure!(depth <= MAX_DEPTH, "containers nest more than {MAX_DEPTH} deep");
    Ok(Rc::new(Items { values, depth }))
}

/// The pickle machine: a stack with marks, and a memo whose values are shared, not copied. A container
/// extended after the memo took it is copied first (the memo keeps it as it was): torch.save memoizes a
/// state dict before filling it but never refers to it again, so nothing it writes tells the difference,
/// and no value can contain itself.
struct Machine<'a> {
    buf: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    /// Elements copied when a container the memo shares is extended; bounded by the pickle's size, so
    /// extending a shared container over and over cannot multiply memory.
    copied: usize,
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let left = self.buf.len() - self.pos;
        ensure!(n <= left, "truncated pickle: {n} bytes needed at byte {}, {left} left", self.pos);
        self.pos += n;
        Ok(&self.buf[self.pos - n..self.pos])
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn line(&mut self) -> Result<&'a str> {
        let rest = &self.buf[self.pos..];
        let n = rest.iter().position(|&b| b == b'\n').context("truncated pickle: GLOBAL without a newline")?;
        let line = std::str::from_utf8(&rest[..n]).context("GLOBAL name is not UTF-8")?;
        self.pos += n + 1;
        Ok(line)
    }
    fn str(&mut self, n: usize) -> Result<Value> {
        let bytes = self.take(n)?;
        Ok(Value::Str(std::str::from_utf8(bytes).context("string is not UTF-8")?.into()))
    }
    fn pop(&mut self) -> Result<Value> {
        ensure!(self.stack.len() > self.marks.last().copied().unwrap_or(0), "pickle pops an empty stack");
        Ok(self.stack.pop().expect("checked above"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self.marks.pop().context("pickle pops a mark it never set")?;
        Ok(self.stack.split_off(mark))
    }
    fn top(&mut self) -> Result<&mut Value> {
        ensure!(self.stack.len() > self.marks.last().copied().unwrap_or(0), "pickle uses an empty stack");
        Ok(self.stack.last_mut().expect("checked above"))
    }
    fn memo_put(&mut self, id: u32) -> Result<()> {
        let v = self.top()?.clone();
        self.memo.insert(id, v);
        Ok(())
    }

    /// Appends `new` to the list (`dict` false) or dict on top of the stack.
    fn extend(&mut self, new: Vec<Value>, dict: bool) -> Result<()> {
        let budget = self.buf.len();
        ensure!(self.stack.len() > self.marks.last().copied().unwrap_or(0), "pickle uses an empty stack");
        let (target, copied) = (self.stack.last_mut().expect("checked above"), &mut self.copied);
        let items = match (target, dict) {
            (Value::List(i), false) | (Value::Dict(i), true) => i,
            (other, _) => bail!("pickle adds items to {}", other.kind()),
        };
        ensure!(!dict || new.len().is_multiple_of(2), "pickle sets a dict key without a value");
        if Rc::strong_count(items) > 1 {
            *copied += items.values.len();
            ensure!(*copied <= budget, "pickle copies more values than it holds bytes");
        }
        let depth = 1 + new.iter().map(Value::depth).max().unwrap_or(0);
        ensure!(depth <= MAX_DEPTH, "containers nest more than {MAX_DEPTH} deep");
        let items = Rc::make_mut(items);
        items.depth = items.depth.max(depth);
        items.values.extend(new);
        Ok(())
    }

    /// Runs the pickle to its STOP and returns the value it leaves.
    fn run(mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            let push = match op {
                0x80 => {
                    let proto = self.u8()?;
                    ensure!((2..=4).contains(&proto), "pickle protocol {proto}; torch.save writes 2 to 4");
                    None
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint for buffered readers
                    None
                }
                b'.' => {
                    let v = self.pop()?;
                    ensure!(self.stack.is_empty() && self.marks.is_empty(), "pickle stops with values left over");
                    return Ok(v);
                }
                b'(' => {
                    self.marks.push(self.stack.len());
                    None
                }
                b')' => Some(Value::Tuple(items(vec![])?)),
                b't' => {
                    let v = self.pop_mark()?;
                    Some(Value::Tuple(items(v)?))
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let keep = self.marks.last().copied().unwrap_or(0);
                    ensure!(self.stack.len() >= keep + n, "pickle makes a {n}-tuple of fewer values");
                    let v = self.stack.split_off(self.stack.len() - n);
                    Some(Value::Tuple(items(v)?))
                }
                b']' => Some(Value::List(items(vec![])?)),
                b'}' => Some(Value::Dict(items(vec![])?)),
                b'a' => {
                    let v = self.pop()?;
                    self.extend(vec![v], false)?;
                    None
                }
                b'e' => {
                    let v = self.pop_mark()?;
                    self.extend(v, false)?;
                    None
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.extend(vec![k, v], true)?;
                    None
                }
                b'u' => {
                    let v = self.pop_mark()?;
                    self.extend(v, true)?;
                    None
                }
                b'N' => Some(Value::None),
                0x88 | 0x89 => Some(Value::Bool),
                b'J' => Some(Value::Int(i64::from(self.u32()? as i32))),
                b'K' => Some(Value::Int(i64::from(self.u8()?))),
                b'M' => Some(Value::Int(i64::from(u16::from_le_bytes(self.take(2)?.try_into()?)))),
                0x8a => {
                    let n = usize::from(self.u8()?);
                    ensure!(n <= 8, "pickle integer of {n} bytes; tensor sizes fit in 8");
                    let bytes = self.take(n)?;
                    let mut le = [if bytes.last().is_some_and(|b| b & 0x80 != 0) { 0xff } else { 0 }; 8];
                    le[..n].copy_from_slice(bytes);
                    Some(Value::Int(i64::from_le_bytes(le)))
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    Some(self.str(n)?)
                }
                0x8c => {
                    let n = usize::from(self.u8()?);
                    Some(self.str(n)?)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    Some(Value::Global(Global::find(module, name)?))
                }
                0x93 => {
                    let (name, module) = (self.pop()?, self.pop()?);
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        bail!("STACK_GLOBAL of values that are not strings at byte {at}")
                    };
                    Some(Value::Global(Global::find(&module, &name)?))
                }
                b'q' => {
                    let id = self.u8()?;
                    self.memo_put(id.into())?;
                    None
                }
                b'r' => {
                    let id = self.u32()?;
                    self.memo_put(id)?;
                    None
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len())?;
                    self.memo_put(id)?;
                    None
                }
                b'h' | b'j' => {
                    let id = if op == b'h' { self.u8()?.into() } else { self.u32()? };
                    Some(self.memo.get(&id).with_context(|| format!("pickle gets memo {id}, never put"))?.clone())
                }
                b'Q' => {
                    let id = self.pop()?;
                    Some(Value::Storage(Rc::new(persistent_storage(&id)?)))
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    Some(reduce(&f, &args)?)
                }
                b'b' => {
                    // The state of an OrderedDict (a state dict's `_metadata`): not needed.
                    self.pop()?;
                    let target = self.top()?;
                    ensure!(matches!(target, Value::Dict(_)), "pickle BUILDs {}, not a dict", target.kind());
                    None
                }
                _ => bail!("pickle opcode 0x{op:02x} at byte {at} is not one torch.save writes for a state dict"),
            };
            if let Some(v) = push {
                self.stack.push(v);
            }
        }
    }
}

/// The storage a persistent id `('storage', StorageClass, key, location, numel)` names.
fn persistent_storage(id: &Value) -> Result<StorageRef> {
    if let Value::Tuple(t) = id {
        if let [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), Value::Str(_), Value::Int(n)] =
            t.values.as_slice()
        {
            if &**tag == "storage" && *n >= 0 {
                return Ok(StorageRef { dtype: *dtype, key: key.to_string(), numel: *n as u64 });
            }
        }
    }
    bail!("persistent id is not ('storage', StorageClass, key, location, size)")
}

/// Calls one of the allowed GLOBALs.
fn reduce(f: &Value, args: &Value) -> Result<Value> {
    let Value::Tuple(args) = args else { bail!("REDUCE with {} for arguments", args.kind()) };
    let ints = |v: &Value| -> Option<Vec<u64>> {
        let Value::Tuple(t) = v else { return None };
        t.values.iter().map(|v| if let Value::Int(i) = v { u64::try_from(*i).ok() } else { None }).collect()
    };
    match (f, args.values.as_slice()) {
        (Value::Global(Global::OrderedDict), []) => Ok(Value::Dict(items(vec![])?)),
        (
            Value::Global(Global::RebuildTensor),
            [Value::Storage(s), Value::Int(offset), size, stride, Value::Bool, Value::Dict(_), rest @ ..],
        ) if rest.len() <= 1 => {
            let (Some(shape), Some(strides)) = (ints(size), ints(stride)) else {
                bail!("_rebuild_tensor_v2 with a size or stride that is not a tuple of non-negative ints")
            };
            ensure!(
                shape.len() == strides.len(),
                "_rebuild_tensor_v2 with {} sizes but {} strides",
                shape.len(),
                strides.len()
            );
            let shape = shape.into_iter().map(usize::try_from).collect::<Result<_, _>>()?;
            let offset = u64::try_from(*offset).context("_rebuild_tensor_v2 with a negative offset")?;
            Ok(Value::Tensor(Rc::new(TensorRef { storage: s.clone(), offset, shape, strides })))
        }
        (Value::Global(Global::RebuildParameter), [t @ Value::Tensor(_), Value::Bool, Value::Dict(_)]) => Ok(t.clone()),
        (Value::Global(g), _) => bail!("{g:?} called with arguments torch.save does not write"),
        (other, _) => bail!("REDUCE calls {}", other.kind()),
    }
}

/// The tensors of a `torch.save` zip archive of a state dict, by name.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file = std::fs::File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).context("not a torch.save zip archive")?;
    let pickles: Vec<String> = zip
        .file_names()
        .filter_map(|n| n.ok())
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(|n| n.to_string())
        .collect();
    let [pickle] = pickles.as_slice() else {
        bail!("expected one ARCHIVE/data.pkl in the zip archive, found {}", pickles.len())
    };
    let prefix = &pickle[..pickle.len() - "data.pkl".len()];
    if let Ok(order) = read_entry(&mut zip, &format!("{prefix}byteorder"), 16) {
        ensure!(
            order == b"little",
            "byteorder {:?}; only little-endian files are read",
            String::from_utf8_lossy(&order)
        );
    }
    let bytes = read_entry(&mut zip, pickle, MAX_PICKLE_BYTES.min(file_len))?;
    let machine = Machine { buf: &bytes, pos: 0, stack: vec![], marks: vec![], memo: HashMap::new(), copied: 0 };
    let Value::Dict(dict) = machine.run().with_context(|| format!("reading {pickle}"))? else {
        bail!("{pickle} holds no state dict")
    };

    // Storage by storage, so at most one storage's raw bytes exist besides the tensors made so far.
    let mut by_storage: BTreeMap<&str, Vec<(String, &TensorRef)>> = BTreeMap::new();
    for kv in dict.values.chunks(2) {
        let [Value::Str(name), value] = kv else { bail!("{pickle}: a state dict key is not a string") };
        let Value::Tensor(t) = value else { bail!("{pickle}: `{name}` is {}, not a tensor", value.kind()) };
        by_storage.entry(&t.storage.key).or_default().push((name.to_string(), t));
    }
    // Non-contiguous views are copied; all of them together may not exceed the file.
    let mut gather_budget = file_len;
    let mut out = Vec::new();
    for (key, tensors) in by_storage {
        let s = &tensors[0].1.storage;
        for (name, t) in &tensors {
            ensure!(t.storage == *s, "tensor `{name}`: storage {key} is {:?} here, {s:?} elsewhere", t.storage);
        }
        let entry = format!("{prefix}data/{key}");
        let size = s.numel.checked_mul(s.dtype.size_in_bytes() as u64).filter(|&b| b <= file_len);
        let size = size
            .with_context(|| format!("storage {key} of {} {:?} elements is larger than the file", s.numel, s.dtype))?;
        let stored = zip.by_name(&entry).with_context(|| format!("no {entry} in the zip archive"))?.size();
        ensure!(stored == size, "{entry} holds {stored} bytes; {} {:?} elements need {size}", s.numel, s.dtype);
        let data = read_entry(&mut zip, &entry, size)?;
        for (name, t) in tensors {
            let tensor = view(&data, s.dtype, t, &mut gather_budget).with_context(|| format!("tensor `{name}`"))?;
            out.push((name, tensor));
        }
    }
    Ok(out)
}

/// The tensor `t` of `data`, its storage's bytes: a copy of the elements its offset, shape and strides
/// select, all inside the storage.
fn view(data: &[u8], dtype: DType, t: &TensorRef, gather_budget: &mut u64) -> Result<Tensor> {
    let es = dtype.size_in_bytes() as u64;
    let storage_numel = data.len() as u64 / es;
    let numel = t.shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64)).context("element count overflows")?;
    // The last element's index + 1: offset + sum((size - 1) * stride) + 1.
    let end = if numel == 0 {
        Some(t.offset)
    } else {
        t.shape
            .iter()
            .zip(&t.strides)
            .try_fold(t.offset.checked_add(1), |end, (&d, &s)| Some(end?.checked_add((d as u64 - 1).checked_mul(s)?)))
            .flatten()
    };
    let end = end.filter(|&e| e <= storage_numel);
    end.with_context(|| {
        format!(
            "offset {}, shape {:?} and strides {:?} reach past its storage of {storage_numel}",
            t.offset, t.shape, t.strides
        )
    })?;
    let mut contiguous = true;
    let mut expect = 1u64;
    for (&d, &s) in t.shape.iter().zip(&t.strides).rev() {
        contiguous &= d <= 1 || s == expect;
        expect = expect.saturating_mul(d as u64);
    }
    let (start, es) = (t.offset as usize * es as usize, es as usize);
    if contiguous {
        return Ok(Tensor::from_raw_buffer(&data[start..start + numel as usize * es], dtype, &t.shape, &Device::Cpu)?);
    }
    let bytes = numel * es as u64;
    ensure!(bytes <= *gather_budget, "non-contiguous tensors copy more bytes than the file holds");
    *gather_budget -= bytes;
    let mut out = Vec::with_capacity(bytes as usize);
    let mut index = vec![0usize; t.shape.len()];
    for _ in 0..numel {
        let at = start + index.iter().zip(&t.strides).map(|(&i, &s)| i * s as usize).sum::<usize>() * es;
        out.extend_from_slice(&data[at..at + es]);
        for d in (0..index.len()).rev() {
            index[d] += 1;
            if index[d] < t.shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(Tensor::from_raw_buffer(&out, dtype, &t.shape, &Device::Cpu)?)
}

/// A zip entry's bytes, when it holds at most `max` (checked before reading); zip checks its CRC-32.
fn read_entry<R: Read + std::io::Seek>(zip: &mut zip::ZipArchive<R>, name: &str, max: u64) -> Result<Vec<u8>> {
    let mut entry = zip.by_name(name).with_context(|| format!("no {name} in the zip archive"))?;
    let size = entry.size();
    ensure!(size <= max, "{name} is {size} bytes; at most {max} expected");
    let mut bytes = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut bytes).with_context(|| format!("reading {name}"))?;
    ensure!(bytes.len() as u64 == size, "{name} holds {} bytes, its header says {size}", bytes.len());
    Ok(bytes)
}
