//! Tokenizers of LLaMA-style checkpoints: `tokenizer.json` through the `tokenizers` crate when the
//! checkpoint has one, else the SentencePiece `tokenizer.model` read directly (the 1bitLLM BitNet
//! checkpoints ship only that), plus the tokens the Hugging Face config files add after the vocabulary
//! (`<pad>` = 32000 and `</line>` = 32001 for 1bitLLM). `tokenizer.json` covers the byte-level BPE
//! tokenizers of LLaMA-3 (BitNet b1.58 2B4T, Llama3-8B-1.58) and Falcon3.
//!
//! The ids generation stops at are the tokenizer's EOS and every `eos_token_id` of the checkpoint's
//! `generation_config.json` (LLaMA-3 instruct models end a turn with `<|eot_id|>`, not EOS).

mod sentencepiece;
pub mod template;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// The files a checkpoint's tokenizer may consist of.
const FILES: [&str; 7] = [
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Changes whenever a change of this module's code may change ids, so cached tokenized data is rebuilt.
pub const CODE_VERSION: u32 = 3;

/// Token ids and, for each, the byte range of the text it came from (empty for BOS).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Encoding {
    pub ids: Vec<u32>,
    pub offsets: Vec<Range<usize>>,
}

impl Encoding {
    fn push(&mut self, id: u32, range: Range<usize>) {
        self.ids.push(id);
        self.offsets.push(range);
    }
}

/// Cloning copies the vocabulary: a worker thread's own copy keeps its own BPE cache, which a shared
/// one would lock (`data` tokenizes on every core that way).
#[derive(Clone)]
pub struct Tokenizer {
    backend: Backend,
    files: Vec<PathBuf>,
    bos: u32,
    eos: u32,
    pad: Option<u32>,
    /// EOS and the ids `generation_config.json` lists, in that order, without repeats.
    stop: Vec<u32>,
    /// Counted once: `tokenizers` counts by building the whole vocabulary map (a third of a second for
    /// LLaMA-3's 128,256 ids), and decoding checks ids against it for every streamed token.
    vocab_size: usize,
}

#[derive(Clone)]
enum Backend {
    /// The model with the added tokens appended, and the texts split out before encoding (added and
    /// special tokens, with their ids), longest first.
    SentencePiece {
        model: sentencepiece::Model,
        added: Vec<(String, u32)>,
    },
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Loads from a checkpoint directory, or from one tokenizer file (`tokenizer.json`, or a SentencePiece
    /// `tokenizer.model` under any name) with the config files beside it.
    pub fn load(path: &Path) -> Result<Tokenizer> {
        if path.is_dir() {
            return Tokenizer::from_dir(path);
        }
        ensure!(path.is_file(), "tokenizer {} does not exist", path.display());
        let path = std::path::absolute(path)?;
        let dir = path.parent().context("a tokenizer file has a directory")?;
        Tokenizer::from_files(dir, &path)
    }

    /// Loads from a checkpoint dir: tokenizer.json when present (via the `tokenizers` crate), else
    /// tokenizer.model read directly, plus added tokens from tokenizer_config.json (`added_tokens_decoder`)
    /// and/or added_tokens.json. Errors name the file.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        ensure!(dir.is_dir(), "tokenizer directory {} does not exist", dir.display());
        let dir = std::path::absolute(dir)?;
        let json = dir.join("tokenizer.json");
        let main = if json.is_file() { json } else { dir.join("tokenizer.model") };
        ensure!(main.is_file(), "{} has neither tokenizer.json nor tokenizer.model", dir.display());
        Tokenizer::from_files(&dir, &main)
    }

    /// The tokenizer in `main` (a `.json` file is a `tokenizers` one, anything else SentencePiece), with
    /// the config files of `dir`.
    fn from_files(dir: &Path, main: &Path) -> Result<Tokenizer> {
        // The file in use first; the others too, so a saved checkpoint keeps what its source had (a
        // tokenizer.model beside tokenizer.json serves transformers' slow tokenizer).
        let mut files = vec![main.to_path_buf()];
        files.extend(FILES.iter().map(|f| dir.join(f)).filter(|p| p.is_file() && p != main));
        let config = Config::read(dir)?;
        let (backend, defaults) = if main.extension().is_some_and(|e| e == "json") {
            // tokenizer.json lists its added tokens itself.
            let tok = read_tokenizer_json(main)?;
            // SentencePiece-style names, else LLaMA-3's.
            let named = |names: [&str; 2]| names.iter().find_map(|n| tok.token_to_id(n));
            let defaults = [named(["<s>", "<|begin_of_text|>"]), named(["</s>", "<|end_of_text|>"]), None];
            (Backend::HuggingFace(Box::new(tok)), defaults)
        } else {
            let mut model = sentencepiece::Model::load(main)?;
            let defaults = [model.bos(), model.eos(), model.pad()];
            let mut added = Vec::new();
            for (&id, token) in &config.added {
                let here =
                    || format!("added token {:?} (id {id}) in {}", token.content, dir.join(token.file).display());
                if (id as usize) < model.vocab_size() {
                    // HF configs also list <unk>, <s>, </s>: they must be the model's own pieces, and their
                    // text in the input is split out as their ids, as transformers does.
                    let piece = model.id_to_piece(id);
                    ensure!(piece == Some(token.content.as_str()), "{}: tokenizer.model has {piece:?} there", here());
                    added.push((token.content.clone(), id));
                    continue;
                }
                ensure!(id as usize == model.vocab_size(), "{}: the next free id is {}", here(), model.vocab_size());
                let named =
                    [&config.bos, &config.eos, &config.pad].iter().any(|n| n.as_deref() == Some(&token.content));
                let special = token.special || named;
                model.push_token(&token.content, special).with_context(here)?;
                added.push((token.content.clone(), id));
            }
            // The special tokens the config files name are split out too where added_tokens_decoder leaves
            // them out (older configs list them only in special_tokens_map.json); one naming no piece is
            // an error below, or an appended token already in the list.
            for name in [&config.bos, &config.eos, &config.pad, &config.unk].into_iter().flatten() {
                if let Some(id) = model.piece_to_id(name).filter(|_| added.iter().all(|(t, _)| t != name)) {
                    added.push((name.clone(), id));
                }
            }
            added.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
            (Backend::SentencePiece { model, added }, defaults)
        };
        let vocab_size = match &backend {
            Backend::SentencePiece { model, .. } => model.vocab_size(),
            Backend::HuggingFace(t) => t.get_vocab_size(true),
        };
        let mut tok = Tokenizer { backend, files, bos: 0, eos: 0, pad: None, stop: Vec::new(), vocab_size };
        let [bos, eos, pad] = [&config.bos, &config.eos, &config.pad].map(|name| {
            name.as_ref().map(|n| {
                tok.token_to_id(n).with_context(|| {
                    format!(
                        "special token {n:?} named in the config files of {} is not in the vocabulary",
                        dir.display()
                    )
                })
            })
        });
        let missing = |what: &str| {
            format!("no {what} token: neither the config files of {} nor the model name one", dir.display())
        };
        tok.bos = bos.transpose()?.or(defaults[0]).with_context(|| missing("BOS"))?;
        tok.eos = eos.transpose()?.or(defaults[1]).with_context(|| missing("EOS"))?;
        tok.pad = pad.transpose()?.or(defaults[2]);
        tok.stop = vec![tok.eos];
        for id in generation_eos_ids(dir)? {
            let n = tok.vocab_size();
            ensure!(
                (id as usize) < n,
                "{}: eos_token_id {id} is outside the tokenizer's vocabulary of {n}",
                dir.join("generation_config.json").display()
            );
            if !tok.stop.contains(&id) {
                tok.stop.push(id);
            }
        }
        Ok(tok)
    }

    /// An error unless every id of this tokenizer is a row of a model with `model_vocab` rows
    /// (`vocab_size` of `config`): a model cannot embed ids past its table.
    pub fn check_fits(&self, model_vocab: usize, config: &Path) -> Result<()> {
        let n = self.vocab_size();
        ensure!(
            n <= model_vocab,
            "the tokenizer ({}) has {n} ids but the model has {model_vocab} (vocab_size in {}): they do not belong \
             together",
            self.files.first().map_or_else(String::new, |f| f.display().to_string()),
            config.display()
        );
        Ok(())
    }

    /// Files that make up this tokenizer (absolute paths; the one in use first), so a checkpoint saver can
    /// copy them.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Token ids of `text`, with BOS first when `add_bos`; never adds EOS.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        Ok(self.encode_with_offsets(text, add_bos)?.ids)
    }

    /// Token ids of `text` and the byte range of `text` each came from, with BOS first when `add_bos`.
    ///
    /// Added and special tokens (`<s>`, `</s>`, `<pad>`, `</line>`, `<|eot_id|>`) in the text are split out
    /// first and become their ids, as in Hugging Face tokenizers, so a chat template's `eos_token` is the
    /// EOS id. A bare `tokenizer.model` without config files splits nothing, as sentencepiece does. The dummy-prefix space goes only before text at the very start
    /// of the input, not before text that follows an added token, so "a</line>b" encodes "b" without a
    /// space it never had: that is what HF's LlamaTokenizer does with `legacy: false` and tokenizer.json
    /// files with `prepend_scheme: "first"` (the legacy mode prefixes every segment, which sentencepiece
    /// itself never does inside a text). Text that starts with an added token gets no dummy prefix at all,
    /// as in HF.
    pub fn encode_with_offsets(&self, text: &str, add_bos: bool) -> Result<Encoding> {
        let mut out = Encoding::default();
        out.ids.reserve(text.len() / 3 + 2);
        if add_bos {
            out.push(self.bos, 0..0);
        }
        match &self.backend {
            Backend::HuggingFace(t) => {
                let e = t.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
                out.ids.extend_from_slice(e.get_ids());
                out.offsets.extend(e.get_offsets().iter().map(|&(a, b)| a..b));
            }
            Backend::SentencePiece { model, added } => {
                let (mut segment, mut i) = (0, 0);
                while let Some(c) = text[i..].chars().next() {
                    match added.iter().find(|(t, _)| text[i..].starts_with(t.as_str())) {
                        Some((t, id)) => {
                            model.encode(&text[segment..i], segment == 0, segment, &mut out);
                            out.push(*id, i..i + t.len());
                            i += t.len();
                            segment = i;
                        }
                        None => i += c.len_utf8(),
                    }
                }
                model.encode(&text[segment..], segment == 0, segment, &mut out);
            }
        }
        Ok(out)
    }

    /// The text of `ids`, exactly as Python sentencepiece's `decode` renders it for tokenizer.model
    /// (<unk> shows as " ⁇ "): special tokens (BOS, EOS, pad) decode to nothing, all else is kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.backend {
            Backend::SentencePiece { model, .. } => model.decode(ids),
            Backend::HuggingFace(t) => {
                let n = self.vocab_size();
                // `tokenizers` silently drops unknown ids; treat them as the error they are.
                ensure!(ids.iter().all(|&id| (id as usize) < n), "token id out of range for a vocabulary of {n}");
                t.decode(ids, true).map_err(|e| anyhow!("decoding: {e}"))
            }
        }
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// The ids that end a generated answer: EOS and the checkpoint's `generation_config.json` EOS ids.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop
    }

    /// The SentencePiece vocabulary, added tokens included; None for a tokenizer.json tokenizer.
    pub fn sentencepiece_vocab(&self) -> Option<SentencePieceVocab> {
        match &self.backend {
            Backend::SentencePiece { model, .. } => Some(SentencePieceVocab {
                pieces: model.pieces().map(|(text, score, kind)| (text.to_string(), score, kind)).collect(),
                adds_dummy_prefix: model.adds_dummy_prefix(),
            }),
            Backend::HuggingFace(_) => None,
        }
    }

    /// The byte-level BPE vocabulary of a `tokenizer.json` tokenizer (LLaMA-3's, Falcon3's); None for a
    /// SentencePiece one or another `tokenizers` model.
    pub fn bpe_vocab(&self) -> Result<Option<BpeVocab>> {
        let Backend::HuggingFace(t) = &self.backend else { return Ok(None) };
        let tokenizers::models::ModelWrapper::BPE(bpe) = t.get_model() else { return Ok(None) };
        // The merges are private to the crate's BPE model; its serialized form lists them by rank.
        let model = serde_json::to_value(bpe)?;
        let merges = model["merges"]
            .as_array()
            .context("tokenizer.json: the BPE model has no merges")?
            .iter()
            .map(|m| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(pair) => match (pair.first().and_then(Value::as_str), pair.get(1).and_then(Value::as_str))
                {
                    (Some(a), Some(b)) if pair.len() == 2 => Ok(format!("{a} {b}")),
                    _ => bail!("tokenizer.json: a merge that is not a pair of strings: {m}"),
                },
                other => bail!("tokenizer.json: a merge that is not a pair of strings: {other}"),
            })
            .collect::<Result<_>>()?;
        let added = t.get_added_tokens_decoder();
        let mut tokens = vec![None; self.vocab_size];
        for (text, id) in t.get_vocab(true) {
            let kind = match added.get(&id) {
                Some(token) if token.special => BpeVocab::CONTROL,
                Some(_) => BpeVocab::USER_DEFINED,
                None => BpeVocab::NORMAL,
            };
            if let Some(slot) = tokens.get_mut(id as usize) {
                *slot = Some((text, kind));
            }
        }
        Ok(Some(BpeVocab { tokens, merges }))
    }

    pub fn token_to_id(&self, piece: &str) -> Option<u32> {
        match &self.backend {
            Backend::SentencePiece { model, .. } => model.piece_to_id(piece),
            Backend::HuggingFace(t) => t.token_to_id(piece),
        }
    }

    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::SentencePiece { model, .. } => model.id_to_piece(id).map(str::to_string),
            Backend::HuggingFace(t) => t.id_to_token(id),
        }
    }
}

/// A SentencePiece vocabulary as GGUF stores it.
pub struct SentencePieceVocab {
    /// Text, score and type of each id; types are sentencepiece's (and GGUF's): NORMAL 1, UNKNOWN 2,
    /// CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
    pub pieces: Vec<(String, f32, i32)>,
    /// Whether encoding puts a space before the text.
    pub adds_dummy_prefix: bool,
}

/// A byte-level BPE vocabulary as GGUF stores it (`tokenizer.ggml.model = "gpt2"`).
pub struct BpeVocab {
    /// Each id's text and token type, classified as llama.cpp's converter does: added tokens are CONTROL
    /// when special, else USER_DEFINED, the rest NORMAL; None for an id without a token.
    pub tokens: Vec<Option<(String, i32)>>,
    /// The merges by rank, each "left right".
    pub merges: Vec<String>,
}

impl BpeVocab {
    pub const NORMAL: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
}

/// An added token as the config files describe it.
struct AddedToken {
    content: String,
    special: bool,
    file: &'static str,
}

/// What tokenizer_config.json, special_tokens_map.json and added_tokens.json say.
#[derive(Default)]
struct Config {
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
    added: BTreeMap<u32, AddedToken>,
}

impl Config {
    fn read(dir: &Path) -> Result<Config> {
        let mut c = Config::default();
        // tokenizer_config.json first; special_tokens_map.json fills in what it leaves out.
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(file);
            let Some(json) = read_json(&path)? else { continue };
            let slots = [
                ("bos_token", &mut c.bos),
                ("eos_token", &mut c.eos),
                ("pad_token", &mut c.pad),
                ("unk_token", &mut c.unk),
            ];
            for (key, slot) in slots {
                if slot.is_none() {
                    *slot = token_content(json.get(key));
                }
            }
            let Some(decoder) = json.get("added_tokens_decoder") else { continue };
            let decoder = decoder
                .as_object()
                .with_context(|| format!("{}: added_tokens_decoder is not an object", path.display()))?;
            for (id, token) in decoder {
                let bad = || format!("{}: bad added token {id:?}: {token}", path.display());
                let content = token_content(Some(token)).with_context(bad)?;
                let special = token.get("special").and_then(Value::as_bool).unwrap_or(false);
                c.add(id.parse().with_context(bad)?, AddedToken { content, special, file }, dir)?;
            }
        }
        let file = "added_tokens.json";
        let path = dir.join(file);
        if let Some(json) = read_json(&path)? {
            let map = json.as_object().with_context(|| format!("{} is not a JSON object", path.display()))?;
            for (content, id) in map {
                let id = id.as_u64().and_then(|id| u32::try_from(id).ok());
                let id = id.with_context(|| format!("{}: bad id for {content:?}", path.display()))?;
                // Where both files list a token, tokenizer_config.json also says whether it is special.
                match c.added.get(&id) {
                    Some(t) if t.content == *content => {}
                    _ => c.add(id, AddedToken { content: content.clone(), special: false, file }, dir)?,
                }
            }
        }
        Ok(c)
    }

    /// Records an added token. An empty one would match everywhere (encoding would never advance) and two
    /// for one text or one id make the ids ambiguous: errors naming the file and the id.
    fn add(&mut self, id: u32, token: AddedToken, dir: &Path) -> Result<()> {
        let here = || format!("{}: added token id {id}", dir.join(token.file).display());
        ensure!(!token.content.is_empty(), "{}: the token is empty", here());
        if let Some(old) = self.added.get(&id) {
            bail!("{}: {:?}, but {} gives that id to {:?}", here(), token.content, old.file, old.content);
        }
        if let Some((other, _)) = self.added.iter().find(|(_, t)| t.content == token.content) {
            bail!("{}: {:?} is also added token id {other}", here(), token.content);
        }
        self.added.insert(id, token);
        Ok(())
    }
}

/// The `eos_token_id` (a number or a list) of `dir/generation_config.json`; none without the file.
fn generation_eos_ids(dir: &Path) -> Result<Vec<u32>> {
    let path = dir.join("generation_config.json");
    let Some(json) = read_json(&path)? else { return Ok(Vec::new()) };
    let id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    let bad = || format!("{}: eos_token_id must be a token id or a list of them", path.display());
    match json.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list.iter().map(|v| id(v).with_context(bad)).collect(),
        Some(v) => Ok(vec![id(v).with_context(bad)?]),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?))
}

/// A `tokenizer.json` through the `tokenizers` crate, which panics on some malformed files instead of
/// returning an error: on syntax errors in the `decoder` section (so the syntax is checked first, for a
/// message with line and column), and on a `continuing_subword_prefix` longer than a merged token (so a
/// panic while building is caught and becomes an error naming the file).
fn read_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text).with_context(|| format!("parsing {}", path.display()))?;
    match std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()) {
        Ok(tok) => tok.map_err(|e| anyhow!("loading {}: {e}", path.display())),
        Err(panic) => {
            let why =
                panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            bail!("loading {}: the tokenizers crate failed on it: {}", path.display(), why.unwrap_or_default())
        }
    }
}

/// A token in the config files: `"<s>"` or `{"content": "<s>", ...}`; `null` means none.
fn token_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// Incremental detokenizer for streaming generation. Each `push` returns the text that became final; the
/// pieces returned (and `finish`'s rest) add up to `decode(prompt ++ pushed)` minus `decode(prompt)`
/// (minus its trailing U+FFFDs when the prompt ends inside a character that the pushed bytes complete).
///
/// It decodes a short window of ids that starts with already returned text, so the leading-space rule
/// sees the same context as a full decode, and holds text back while it ends in U+FFFD, which may be a
/// character whose remaining byte tokens are still to come (the 🐂 emoji is 4 byte tokens).
pub struct DecodeStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    /// `ids[prefix..read]` is text already accounted for, `ids[read..]` is not yet returned.
    prefix: usize,
    read: usize,
    prompt_len: usize,
}

impl<'a> DecodeStream<'a> {
    pub fn new(tok: &'a Tokenizer, prompt_ids: &[u32]) -> Self {
        let n = prompt_ids.len();
        DecodeStream { tok, ids: prompt_ids.to_vec(), prefix: 0, read: n, prompt_len: n }
    }

    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (done, text) = self.texts()?;
        let Some(new) = text.strip_prefix(done.as_str()) else {
            // Earlier text changed: only Hugging Face's byte fallback does that, turning a run of byte
            // tokens into U+FFFDs once it turns out invalid. What was returned stands; go on from here.
            self.read = self.ids.len();
            return Ok(None);
        };
        if new.is_empty() || new.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new = new.to_string();
        // The window may start at the new text only if that decodes to something on its own (a window
        // starting with nothing visible would strip the leading space of what follows), and not at the end
        // of the prompt, which may fall inside a character.
        if self.read > self.prompt_len && !self.tok.decode(&self.ids[self.read..])?.is_empty() {
            self.prefix = self.read;
        }
        self.read = self.ids.len();
        Ok(Some(new))
    }

    /// The text held back at the end of generation (a U+FFFD for an incomplete character), if any.
    pub fn finish(self) -> Result<Option<String>> {
        let (done, text) = self.texts()?;
        Ok(text.strip_prefix(done.as_str()).filter(|s| !s.is_empty()).map(str::to_string))
    }

    /// The text already accounted for and the text of the whole window. A prompt that ends inside a
    /// character decodes with trailing U+FFFDs that the next bytes replace, so those do not count as done.
    fn texts(&self) -> Result<(String, String)> {
        let mut done = self.tok.decode(&self.ids[self.prefix..self.read])?;
        done.truncate(done.trim_end_matches('\u{FFFD}').len());
        Ok((done, self.tok.decode(&self.ids[self.prefix..])?))
    }
}
