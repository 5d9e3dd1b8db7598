//! Tokenizers of LLaMA-style checkpoints: `tokenizer.json` through the `tokenizers` crate when the
//! checkpoint has one, else the SentencePiece `tokenizer.model` read directly (the 1bitLLM BitNet
//! checkpoints ship only that), plus the tokens the Hugging Face config files add after the vocabulary
//! (`<pad>` = 32000 and `</line>` = 32001 for 1bitLLM).

mod sentencepiece;
pub mod template;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The files a checkpoint's tokenizer may consist of.
const FILES: [&str; 5] =
    ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"];

pub struct Tokenizer {
    backend: Backend,
    files: Vec<PathBuf>,
    bos: u32,
    eos: u32,
    pad: Option<u32>,
}

enum Backend {
    /// The model with the added tokens appended, and those tokens (text, id), longest first.
    SentencePiece {
        model: sentencepiece::Model,
        added: Vec<(String, u32)>,
    },
    HuggingFace(Box<tokenizers::Tokenizer>),
}

impl Tokenizer {
    /// Loads from a checkpoint dir: tokenizer.json when present (via the `tokenizers` crate), else
    /// tokenizer.model read directly, plus added tokens from tokenizer_config.json (`added_tokens_decoder`)
    /// and/or added_tokens.json. Errors name the file.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer> {
        ensure!(dir.is_dir(), "tokenizer directory {} does not exist", dir.display());
        let dir = std::path::absolute(dir)?;
        let files = FILES.iter().map(|f| dir.join(f)).filter(|p| p.is_file()).collect();
        let config = Config::read(&dir)?;
        let json = dir.join("tokenizer.json");
        let (backend, defaults) = if json.is_file() {
            // tokenizer.json lists its added tokens itself.
            let tok = read_tokenizer_json(&json)?;
            let defaults = [tok.token_to_id("<s>"), tok.token_to_id("</s>"), None];
            (Backend::HuggingFace(Box::new(tok)), defaults)
        } else {
            let path = dir.join("tokenizer.model");
            ensure!(path.is_file(), "{} has neither tokenizer.json nor tokenizer.model", dir.display());
            let mut model = sentencepiece::Model::load(&path)?;
            let defaults = [model.bos(), model.eos(), model.pad()];
            let mut added = Vec::new();
            for (&id, token) in &config.added {
                let here =
                    || format!("added token {:?} (id {id}) in {}", token.content, dir.join(token.file).display());
                if (id as usize) < model.vocab_size() {
                    // HF configs also list <unk>, <s>, </s>: they must be the model's own pieces.
                    let piece = model.id_to_piece(id);
                    ensure!(piece == Some(token.content.as_str()), "{}: tokenizer.model has {piece:?} there", here());
                    continue;
                }
                ensure!(id as usize == model.vocab_size(), "{}: the next free id is {}", here(), model.vocab_size());
                let named =
                    [&config.bos, &config.eos, &config.pad].iter().any(|n| n.as_deref() == Some(&token.content));
                let special = token.special || named;
                model.push_token(&token.content, special).with_context(here)?;
                added.push((token.content.clone(), id));
            }
            added.sort_by_key(|(text, _)| std::cmp::Reverse(text.len()));
            (Backend::SentencePiece { model, added }, defaults)
        };
        let mut tok = Tokenizer { backend, files, bos: 0, eos: 0, pad: None };
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
        Ok(tok)
    }

    /// Files that make up this tokenizer (absolute paths), so a checkpoint saver can copy them.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Token ids of `text`, with BOS first when `add_bos`; never adds EOS.
    ///
    /// Added tokens (`<pad>`, `</line>`) in the text are split out first and become their ids, as in
    /// Hugging Face tokenizers. The dummy-prefix space goes only before text at the very start of the
    /// input, not before text that follows an added token, so "a</line>b" encodes "b" without a space it
    /// never had: that is what HF's LlamaTokenizer does with `legacy: false` and tokenizer.json files with
    /// `prepend_scheme: "first"` (the legacy mode prefixes every segment, which sentencepiece itself never
    /// does inside a text). Text that starts with an added token gets no dummy prefix at all, as in HF.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            ids.push(self.bos);
        }
        match &self.backend {
            Backend::HuggingFace(t) => {
                ids.extend_from_slice(t.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?.get_ids())
            }
            Backend::SentencePiece { model, added } => {
                let (mut segment, mut i) = (0, 0);
                while let Some(c) = text[i..].chars().next() {
                    match added.iter().find(|(t, _)| text[i..].starts_with(t.as_str())) {
                        Some((t, id)) => {
                            model.encode(&text[segment..i], segment == 0, &mut ids);
                            ids.push(*id);
                            i += t.len();
                            segment = i;
                        }
                        None => i += c.len_utf8(),
                    }
                }
                model.encode(&text[segment..], segment == 0, &mut ids);
            }
        }
        Ok(ids)
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
        match &self.backend {
            Backend::SentencePiece { model, .. } => model.vocab_size(),
            Backend::HuggingFace(t) => t.get_vocab_size(true),
        }
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
    added: BTreeMap<u32, AddedToken>,
}

impl Config {
    fn read(dir: &Path) -> Result<Config> {
        let mut c = Config::default();
        // tokenizer_config.json first; special_tokens_map.json fills in what it leaves out.
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(file);
            let Some(json) = read_json(&path)? else { continue };
            for (key, slot) in [("bos_token", &mut c.bos), ("eos_token", &mut c.eos), ("pad_token", &mut c.pad)] {
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

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?))
}

/// A `tokenizer.json` through the `tokenizers` crate, which panics on some syntax errors (in its `decoder`
/// section) instead of returning them: the syntax is checked first, so those become errors naming the file.
fn read_tokenizer_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str::<serde::de::IgnoredAny>(&text).with_context(|| format!("parsing {}", path.display()))?;
    text.parse().map_err(|e| anyhow!("loading {}: {e}", path.display()))
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
