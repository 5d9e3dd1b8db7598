//! Hugging Face checkpoint directories: `config.json` plus weights in `model.safetensors`, sharded
//! safetensors (`model.safetensors.index.json`), or `pytorch_model.bin` (also sharded), in F32, F16 or BF16.
//! Loading goes through a candle `VarBuilder` whose backend knows which file holds each tensor, so every
//! error names the file and the tensor. Saving writes the layout transformers' `save_pretrained` writes.
//!
//! A checkpoint of transformers' offline `bitnet` quantization (`config.json`'s `quantization()` is
//! `Bitnet`: 2-bit codes or float ternary values plus a `weight_scale` per projection) is read as latent
//! weights, `value x absmean / nonzero share` (`model::bitnet_packed::latent`): Bessie's quantizer turns them
//! back into the stored values and scale (when read as f32, as Bessie's loaders read projections), so
//! inference, export and training load it like any checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::bitnet_packed;
use crate::config::model::{Quantization, WeightScale};
use crate::config::ModelConfig;

pub const CONFIG_FILE: &str = "config.json";
pub const SAFETENSORS_FILE: &str = "model.safetensors";
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
pub const PTH_FILE: &str = "pytorch_model.bin";
pub const PTH_INDEX: &str = "pytorch_model.bin.index.json";

enum Storage {
    Safetensors(MmapedSafetensors),
    /// PyTorch pickles are read whole: they are not memory-mappable.
    Pth(HashMap<String, Tensor>),
}

/// The tensors of a checkpoint directory, by name, with the file each one lives in.
pub struct WeightFiles {
    storage: Storage,
    file_of: HashMap<String, PathBuf>,
    /// What a missing tensor's error names as the place it was looked for.
    source: String,
    nonfinite: NonFinite,
    /// How the projections' `weight_scale` relates to the absmean, when they are stored ternary
    /// (transformers' offline `bitnet`); None for latent weights.
    ternary: Option<WeightScale>,
}

/// What loading does with a weight that holds NaN or infinite values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFinite {
    /// An error naming the tensor: training on it would only spread the NaNs.
    Refuse,
    /// A warning naming the tensor (inference still shows what the model does).
    Warn,
}

impl WeightFiles {
    /// Finds the weights in `dir`, preferring safetensors over PyTorch pickles.
    pub fn open(dir: &Path, nonfinite: NonFinite) -> Result<Self> {
        let at = |f: &str| dir.join(f);
        let mut weights = if is_regular_file(&at(SAFETENSORS_INDEX))? {
            let (files, map) = read_index(&at(SAFETENSORS_INDEX))?;
            Self::safetensors(files, SAFETENSORS_INDEX)?.check_index(&map)?
        } else if is_regular_file(&at(SAFETENSORS_FILE))? {
            Self::safetensors(vec![at(SAFETENSORS_FILE)], SAFETENSORS_FILE)?
        } else if is_regular_file(&at(PTH_INDEX))? {
            let (files, map) = read_index(&at(PTH_INDEX))?;
            Self::pth(files, PTH_INDEX)?.check_index(&map)?
        } else if is_regular_file(&at(PTH_FILE))? {
            Self::pth(vec![at(PTH_FILE)], PTH_FILE)?
        } else {
            bail!(
                "no weights in {}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {PTH_FILE} or {PTH_INDEX}",
                dir.display()
            )
        };
        weights.nonfinite = nonfinite;
        Ok(weights)
    }

    /// Reads the projections as `quantization` says they are stored (see the module's documentation).
    pub fn with_quantization(mut self, quantization: Quantization) -> Self {
        self.ternary = match quantization {
            Quantization::Bitnet { scale } => Some(scale),
            Quantization::Latent | Quantization::BessieTernary => None,
        };
        self
    }

    /// Checks that every tensor is in the shard the index maps it to, and the index maps every tensor.
    fn check_index(self, map: &BTreeMap<String, PathBuf>) -> Result<Self> {
        for (name, file) in &self.file_of {
            match map.get(name) {
                Some(f) if f == file => {}
                Some(f) => bail!(
                    "{}: tensor `{name}` is in {}, not {} as the index says",
                    self.source,
                    file.display(),
                    f.display()
                ),
                None => bail!("{}: tensor `{name}` of {} is not in the index", self.source, file.display()),
            }
        }
        if let Some((name, f)) = map.iter().find(|(name, _)| !self.file_of.contains_key(*name)) {
            bail!("{}: tensor `{name}` is not in {}, where the index says it is", self.source, f.display());
        }
        Ok(self)
    }

    fn safetensors(files: Vec<PathBuf>, source: &str) -> Result<Self> {
        // SAFETY: the files are mapped read-only; Bessie never writes a checkpoint in place (saves go to a
        // temporary name and are renamed), so the mapping does not change under us.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("reading {}", display_files(&files)))?;
        let mut file_of = HashMap::new();
        for f in &files {
            // SAFETY: as above.
            let one = unsafe { MmapedSafetensors::new(f) }?;
            for (name, _) in one.tensors() {
                add_tensor(&mut file_of, name, f)?;
            }
        }
        Ok(Self {
            storage: Storage::Safetensors(st),
            file_of,
            source: source.into(),
            nonfinite: NonFinite::Refuse,
            ternary: None,
        })
    }

    fn pth(files: Vec<PathBuf>, source: &str) -> Result<Self> {
        let (mut tensors, mut file_of) = (HashMap::new(), HashMap::new());
        for f in &files {
            let all = super::pth::read(f).with_context(|| format!("reading {}", f.display()))?;
            for (name, t) in all {
                add_tensor(&mut file_of, name.clone(), f)?;
                tensors.insert(name, t);
            }
        }
        Ok(Self {
            storage: Storage::Pth(tensors),
            file_of,
            source: source.into(),
            nonfinite: NonFinite::Refuse,
            ternary: None,
        })
    }

    /// The shape of tensor `name` as its file says, without reading its data; None when there is none.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        match &self.storage {
            Storage::Safetensors(st) => st.get(name).ok().map(|v| v.shape().to_vec()),
            Storage::Pth(map) => map.get(name).map(|t| t.dims().to_vec()),
        }
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.file_of.keys()
    }

    /// Tensor `name` on the CPU as stored, and its file.
    fn read(&self, name: &str) -> candle_core::Result<(&Path, Tensor)> {
        let Some(file) = self.file_of.get(name) else { candle_core::bail!("{}: missing tensor `{name}`", self.source) };
        let t = match &self.storage {
            Storage::Safetensors(st) => st.load(name, &Device::Cpu),
            Storage::Pth(map) => Ok(map[name].clone()),
        }
        .map_err(|e| candle_core::Error::Msg(format!("{}: tensor `{name}`: {e}", file.display())))?;
        Ok((file, t))
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let (file, t) = self.read(name)?;
        // Integers where floats are wanted (or the reverse) are a corrupt or foreign file, not a conversion.
        if t.dtype() != dtype && !(t.dtype().is_float() && dtype.is_float()) {
            candle_core::bail!("{}: tensor `{name}` is {:?}, expected {:?}", file.display(), t.dtype(), dtype);
        }
        let t = t.to_dtype(dtype)?;
        // Checked after the conversion: large finite f32 values overflow f16.
        let bad = count_nonfinite(&t)?;
        if bad > 0 {
            let msg = format!("{}: tensor `{name}` has {bad} NaN or infinite values", file.display());
            match self.nonfinite {
                NonFinite::Refuse => candle_core::bail!("{msg}"),
                NonFinite::Warn => eprintln!("warning: {msg}; the model's outputs will not mean anything"),
            }
        }
        t.to_device(device)
    }

    /// The latent weights `[out, in]` of the ternary projection `name` (U8 codes `[ceil(out/4), in]` or float
    /// ternary values `[out, in]`) and its `weight_scale`, as `bitnet_packed::latent` makes them.
    fn load_ternary(&self, name: &str, shape: &Shape, kind: WeightScale) -> candle_core::Result<Tensor> {
        let (out, cols) = shape.dims2()?;
        let (file, stored) = self.read(name)?;
        let fail = |msg: String| candle_core::Error::Msg(format!("{}: tensor `{name}` {msg}", file.display()));
        let values = match stored.dtype() {
            DType::U8 => {
                let rows = bitnet_packed::packed_rows(out);
                if stored.dims() != [rows, cols] {
                    return Err(fail(format!(
                        "has shape {:?}, but the packed ternary codes of a {out} x {cols} projection (config.json) \
                         are U8 [ceil({out}/4), {cols}] = [{rows}, {cols}]",
                        stored.dims()
                    )));
                }
                bitnet_packed::unpack(&stored.flatten_all()?.to_vec1::<u8>()?, out, cols)
                    .map_err(|e| fail(format!("(packed ternary codes): {e}")))?
            }
            d if d.is_float() => {
                check_shape(file, name, stored.shape(), shape)?;
                let floats = stored.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                match floats.iter().position(|v| ![-1.0, 0.0, 1.0].contains(v)) {
                    Some(i) => {
                        return Err(fail(format!(
                            "holds {} at [{}, {}]; config.json's offline `bitnet` quantization_config stores \
                             ternary values (-1, 0, 1)",
                            floats[i],
                            i / cols,
                            i % cols
                        )))
                    }
                    None => floats.into_iter().map(|v| v as i8).collect(),
                }
            }
            d => return Err(fail(format!("is {d:?}; packed ternary weights are U8 codes or float ternary values"))),
        };
        let scale_name = format!("{name}_scale");
        let (scale_file, scale) = self.read(&scale_name).map_err(|_| {
            fail(format!(
                "has no `{scale_name}` in {}; config.json's offline `bitnet` quantization needs one",
                self.source
            ))
        })?;
        let scale_fail =
            |msg: String| candle_core::Error::Msg(format!("{}: tensor `{scale_name}` {msg}", scale_file.display()));
        if scale.elem_count() != 1 || !scale.dtype().is_float() {
            return Err(scale_fail(format!("is {:?} {:?}; expected one float", scale.dtype(), scale.dims())));
        }
        let s = scale.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
        if !(s.is_finite() && s > 0.0) {
            return Err(scale_fail(format!("is {s}; a weight scale is finite and positive")));
        }
        bitnet_packed::latent(&values, out, cols, kind.absmean(s) as f32)
            .map_err(|e| scale_fail(format!("is {s}: {e}")))
    }

    /// A `VarBuilder` over these weights producing `dtype` tensors on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for WeightFiles {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(kind) = self.ternary.filter(|_| super::is_bitlinear(name)) {
            return self.load_ternary(name, &shape, kind)?.to_dtype(dtype)?.to_device(device);
        }
        if let (Some(file), Storage::Safetensors(st)) = (self.file_of.get(name), &self.storage) {
            // Check the shape from the header before converting gigabytes of data.
            let found: Shape = st.get(name)?.shape().into();
            check_shape(file, name, &found, &shape)?;
        }
        let t = self.load(name, dtype, device)?;
        check_shape(&self.file_of[name], name, t.shape(), &shape)?;
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.file_of.contains_key(name)
    }
}

/// NaN and infinite elements of a CPU tensor, counted in place; zero for integer tensors.
fn count_nonfinite(t: &Tensor) -> candle_core::Result<usize> {
    use candle_core::{CpuStorage, Storage};
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        candle_core::bail!("weights are checked on the CPU")
    };
    Ok(match cpu {
        CpuStorage::F32(v) => v[start..end].iter().filter(|x| !x.is_finite()).count(),
        CpuStorage::F64(v) => v[start..end].iter().filter(|x| !x.is_finite()).count(),
        CpuStorage::F16(v) => v[start..end].iter().filter(|x| !x.is_finite()).count(),
        CpuStorage::BF16(v) => v[start..end].iter().filter(|x| !x.is_finite()).count(),
        _ => 0,
    })
}

/// Records that tensor `name` lives in `file`; a name in two files is ambiguous.
fn add_tensor(file_of: &mut HashMap<String, PathBuf>, name: String, file: &Path) -> Result<()> {
    if let Some(other) = file_of.get(&name) {
        bail!("tensor `{name}` is in both {} and {}", other.display(), file.display());
    }
    file_of.insert(name, file.to_path_buf());
    Ok(())
}

/// Whether `path` exists as a regular file (after symlinks, which Hugging Face's cache uses); anything
/// else under a weight file's name (a FIFO, a device, a directory) is an error naming it.
fn is_regular_file(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(true),
        Ok(_) => bail!("{} is not a regular file", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn check_shape(file: &Path, name: &str, found: &Shape, expected: &Shape) -> candle_core::Result<()> {
    if found != expected {
        candle_core::bail!(
            "{}: tensor `{name}` has shape {:?} but config.json implies {:?}",
            file.display(),
            found.dims(),
            expected.dims()
        );
    }
    Ok(())
}

fn display_files(files: &[PathBuf]) -> String {
    files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// The shard files an index's `weight_map` names, in order of first appearance, and the map with the
/// shards' paths. A shard is a plain file name in the index's directory: no separators, `..` or absolute
/// paths reaching other files, and a regular file, not a FIFO or device that would hang or mislead.
fn read_index(path: &Path) -> Result<(Vec<PathBuf>, BTreeMap<String, PathBuf>)> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let index: Index = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    let mut map = BTreeMap::new();
    for (name, f) in index.weight_map {
        let plain = !f.is_empty() && f != "." && f != ".." && !f.contains(['/', '\\', '\0']);
        if !plain {
            bail!(
                "{}: tensor `{name}` is in shard {f:?}, which is not a file name in the checkpoint directory",
                path.display()
            );
        }
        let p = dir.join(&f);
        if !files.contains(&p) {
            if !is_regular_file(&p)? {
                bail!("{}: lists shard {f}, which does not exist", path.display());
            }
            files.push(p.clone());
        }
        map.insert(name, p);
    }
    Ok((files, map))
}

/// Loads `config.json` and a `VarBuilder` over the weights of a checkpoint directory, refusing weights
/// with NaN or infinite values.
pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<(ModelConfig, VarBuilder<'static>)> {
    open_with(dir, dtype, device, NonFinite::Refuse)
}

/// [`open`], with what to do about NaN or infinite weights.
pub fn open_with(
    dir: &Path,
    dtype: DType,
    device: &Device,
    nonfinite: NonFinite,
) -> Result<(ModelConfig, VarBuilder<'static>)> {
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let config = dir.join(CONFIG_FILE);
    is_regular_file(&config)?; // a FIFO would block the read
    let cfg = ModelConfig::from_file(&config)?;
    let quantization = cfg.quantization()?;
    let weights = WeightFiles::open(dir, nonfinite)?.with_quantization(quantization);
    check_sizes(&cfg, &weights).with_context(|| format!("{} does not match the weights", config.display()))?;
    if matches!(quantization, Quantization::Bitnet { .. }) {
        eprintln!(
            "{}: loaded packed ternary weights as latent weights (value x scale / nonzero share) for fine-tuning",
            dir.display()
        );
    }
    Ok((cfg, weights.var_builder(dtype, device)))
}

/// Checks config.json's sizes against the shapes the weight files declare, before anything is sized from
/// them: the embedding gives `vocab_size` x `hidden_size`, the first block's MLP sub-norm (where the family
/// has one) `intermediate_size`, and the blocks present `num_hidden_layers`.
fn check_sizes(cfg: &ModelConfig, weights: &WeightFiles) -> Result<()> {
    let expect = |name: &str, shape: Vec<usize>, keys: &str| -> Result<()> {
        match weights.shape_of(name) {
            Some(found) if found == shape => Ok(()),
            Some(found) => bail!("field(s) {keys} say tensor `{name}` is {shape:?}, the weights have {found:?}"),
            None => bail!("field(s) {keys} need tensor `{name}`, which the weights do not have"),
        }
    };
    let (h, l) = (cfg.hidden_size, cfg.num_hidden_layers);
    expect(super::arch::EMBEDDING, vec![cfg.vocab_size, h], "`vocab_size`, `hidden_size`")?;
    // The projections' shapes are checked as they load (packed ones are not [out, in] on disk).
    if let Some(norm) = cfg.family()?.ffn_sub_norm {
        expect(&format!("model.layers.0.{norm}.weight"), vec![cfg.intermediate_size], "`intermediate_size`")?;
    }
    expect(&format!("model.layers.{}.input_layernorm.weight", l - 1), vec![h], "`num_hidden_layers`")?;
    let beyond = format!("model.layers.{l}.");
    if let Some(name) = weights.names().find(|n| n.starts_with(&beyond)) {
        bail!("field `num_hidden_layers` is {l} but the weights have `{name}`");
    }
    Ok(())
}

/// How the weights of a saved checkpoint are laid out on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// One `model.safetensors`.
    Safetensors,
    /// `model-0000N-of-0000M.safetensors` plus `model.safetensors.index.json`.
    Sharded,
    /// `pytorch_model.bin` (a PyTorch zip pickle), for tools that want the old format.
    Pth,
}

/// Writes a checkpoint directory as transformers' `save_pretrained` does: `config.json`, the weights in
/// `layout` (tied `lm_head` omitted), and the tokenizer files copied. Each file is written to a temporary
/// name and renamed, so an interrupted save never leaves a truncated file under the real name.
pub fn save(
    dir: &Path,
    cfg: &ModelConfig,
    tensors: &[(String, Tensor)],
    dtype: DType,
    layout: Layout,
    tokenizer_files: &[PathBuf],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cfg = cfg.clone();
    cfg.extra.insert("torch_dtype".into(), dtype_name(dtype)?.into());
    write_json(&dir.join(CONFIG_FILE), &cfg)?;

    let tensors: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(n, _)| !(cfg.tie_word_embeddings && n == "lm_head.weight"))
        .map(|(n, t)| Ok((n.clone(), crate::device::to_host(&t.to_dtype(dtype)?)?.contiguous()?)))
        .collect::<Result<_>>()?;
    match layout {
        Layout::Safetensors => write_safetensors(&dir.join(SAFETENSORS_FILE), &tensors)?,
        Layout::Pth => write_atomic(&dir.join(PTH_FILE), |tmp| super::pth::write(tmp, &tensors))?,
        Layout::Sharded => {
            // Two shards at least, so the index path is exercised even for tiny models.
            let total: usize = tensors.iter().map(|(_, t)| t.elem_count() * dtype.size_in_bytes()).sum();
            let per_shard = (total / 2).max(1);
            let mut shards: Vec<Vec<(String, Tensor)>> = vec![vec![]];
            let mut size = 0;
            for (n, t) in tensors {
                let bytes = t.elem_count() * dtype.size_in_bytes();
                if size > 0 && size + bytes > per_shard && shards.len() < 2 {
                    shards.push(vec![]);
                    size = 0;
                }
                size += bytes;
                shards.last_mut().expect("one shard at least").push((n, t));
            }
            let m = shards.len();
            let mut weight_map = BTreeMap::new();
            for (i, shard) in shards.iter().enumerate() {
                let file = format!("model-{:05}-of-{m:05}.safetensors", i + 1);
                write_safetensors(&dir.join(&file), shard)?;
                weight_map.extend(shard.iter().map(|(n, _)| (n.clone(), file.clone())));
            }
            let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            write_json(&dir.join(SAFETENSORS_INDEX), &index)?;
        }
    }
    copy_files(dir, tokenizer_files)
}

/// Copies `files` (tokenizer files) into `dir` under their own names, each atomically.
pub(crate) fn copy_files(dir: &Path, files: &[PathBuf]) -> Result<()> {
    for src in files {
        let name = src.file_name().context("tokenizer file without a name")?;
        let dst = dir.join(name);
        if src != &dst {
            write_atomic(&dst, |tmp| Ok(std::fs::copy(src, tmp).map(|_| ())?))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

pub(crate) fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        other => bail!("cannot save weights as {other:?}: use f32, f16 or bf16"),
    })
}

pub(crate) fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    // transformers checks the `format` metadata of safetensors files it loads.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let data: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    write_atomic(path, |tmp| Ok(safetensors::serialize_to_file(data, Some(metadata), tmp)?))
}

/// A safetensors file written one tensor at a time: the header (every name, dtype and shape, known up front)
/// first, then each tensor's bytes as it is pushed, in the declared order, so that a model is never held
/// whole in memory. Unlike `safetensors::serialize`, which needs every tensor at once.
pub(crate) struct StreamedSafetensors {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    entries: Vec<(String, DType, Vec<usize>)>,
    written: usize,
}

impl StreamedSafetensors {
    pub(crate) fn create(path: &Path, entries: Vec<(String, DType, Vec<usize>)>) -> Result<Self> {
        use std::io::Write;
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let mut offset = 0;
        for (name, dtype, shape) in &entries {
            let st_dtype = match dtype {
                DType::U8 => "U8",
                DType::BF16 => "BF16",
                DType::F16 => "F16",
                DType::F32 => "F32",
                other => bail!("tensor `{name}`: cannot write {other:?}"),
            };
            let end = offset + shape.iter().product::<usize>() * dtype.size_in_bytes();
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": st_dtype, "shape": shape, "data_offsets": [offset, end]}),
            );
            offset = end;
        }
        let mut header = serde_json::to_vec(&header)?;
        // The data starts 8-byte aligned, as the safetensors writer pads it.
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        );
        file.write_all(&(header.len() as u64).to_le_bytes())?;
        file.write_all(&header)?;
        Ok(Self { file, path: path.to_path_buf(), entries, written: 0 })
    }

    /// Writes the next declared tensor, which `t` must be (name, dtype and shape).
    pub(crate) fn push(&mut self, name: &str, t: &Tensor) -> Result<()> {
        use std::io::Write;
        let Some((expected, dtype, shape)) = self.entries.get(self.written) else {
            bail!("{}: tensor `{name}` is beyond the {} declared", self.path.display(), self.entries.len())
        };
        ensure!(
            (expected.as_str(), *dtype, shape.as_slice()) == (name, t.dtype(), t.dims()),
            "{}: tensor `{name}` {:?} {:?} where `{expected}` {dtype:?} {shape:?} was declared",
            self.path.display(),
            t.dtype(),
            t.dims()
        );
        self.file.write_all(&safetensors::View::data(&t.contiguous()?))?;
        self.written += 1;
        Ok(())
    }

    /// Flushes and syncs the file once every declared tensor is written.
    pub(crate) fn finish(self) -> Result<()> {
        ensure!(
            self.written == self.entries.len(),
            "{}: {} of {} tensors written",
            self.path.display(),
            self.written,
            self.entries.len()
        );
        self.file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    }
}

pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    write_atomic(path, |tmp| Ok(std::fs::write(tmp, serde_json::to_vec_pretty(value)?)?))
}

/// Writes `path` by letting `write` fill a temporary sibling, fsyncing it, then renaming it into place.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.file_name().context("path without a file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result: Result<()> = (|| {
        write(&tmp)?;
        // Some writers create private files; checkpoints are ordinary readable files.
        #[cfg(unix)]
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}
