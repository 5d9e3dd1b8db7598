//! SentencePiece BPE models read straight from `tokenizer.model` (a serialized `ModelProto`), without the
//! sentencepiece or protobuf crates. Encoding and decoding follow sentencepiece's `bpe_model.cc`,
//! `normalizer.cc` and `sentencepiece_processor.cc` (v0.2) step by step, so ids match Python
//! `sentencepiece` exactly; only the identity normalizer (LLaMA's) is supported.

use anyhow::{anyhow, bail, ensure, Context, Result};
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

/// U+2581, sentencepiece's visible stand-in for a space.
const SPACE: &str = "\u{2581}";

/// `ModelProto.SentencePiece.Type`, plus the byte value of BYTE pieces (`<0xXX>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte(u8),
}

#[derive(Debug, Clone)]
struct Piece {
    text: String,
    score: f32,
    kind: Kind,
}

/// A loaded SentencePiece BPE model, possibly extended with tokens appended after its vocabulary.
#[derive(Debug, Clone)]
pub struct Model {
    pieces: Vec<Piece>,
    ids: HashMap<String, u32>,
    /// USER_DEFINED pieces, longest first: the input is split on them before BPE.
    user_defined: Vec<String>,
    byte_ids: Box<[Option<u32>; 256]>,
    unk: u32,
    byte_fallback: bool,
    trainer_ids: [Option<u32>; 3],
    unk_surface: String,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

impl Model {
    pub fn load(path: &Path) -> Result<Model> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Model::parse(&bytes).with_context(|| format!("invalid SentencePiece model {}", path.display()))
    }

    pub fn parse(bytes: &[u8]) -> Result<Model> {
        let proto = ModelProto::parse(bytes)?;
        ensure!(!proto.pieces.is_empty(), "no pieces");
        let t = &proto.trainer;
        ensure!(
            t.model_type == 2,
            "model_type is {} but only BPE (2) is supported, not UNIGRAM (1), WORD or CHAR",
            t.model_type
        );
        ensure!(!t.treat_whitespace_as_suffix, "treat_whitespace_as_suffix is not supported");
        let n = &proto.normalizer;
        ensure!(
            matches!(n.name.as_str(), "identity" | "") && n.precompiled_charsmap.is_empty(),
            "normalizer {:?} ({} bytes of precompiled_charsmap) is not supported, only \"identity\"",
            n.name,
            n.precompiled_charsmap.len()
        );
        ensure!(
            proto.denormalizer.precompiled_charsmap.is_empty(),
            "denormalizer {:?} is not supported",
            proto.denormalizer.name
        );
        let mut ids = HashMap::with_capacity(proto.pieces.len());
        let (mut user_defined, mut byte_ids, mut unk) = (Vec::new(), Box::new([None; 256]), None);
        for (i, p) in proto.pieces.iter().enumerate() {
            let id = u32::try_from(i)?;
            ensure!(ids.insert(p.text.clone(), id).is_none(), "piece {:?} is defined twice", p.text);
            match p.kind {
                Kind::UserDefined => user_defined.push(p.text.clone()),
                Kind::Unknown => ensure!(unk.replace(id).is_none(), "more than one unknown piece"),
                Kind::Byte(b) => {
                    ensure!(t.byte_fallback, "byte piece {:?} found although byte_fallback is off", p.text);
                    byte_ids[usize::from(b)] = Some(id);
                }
                _ => {}
            }
        }
        user_defined.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let in_range = |id: i32| u32::try_from(id).ok().filter(|&id| (id as usize) < proto.pieces.len());
        Ok(Model {
            ids,
            user_defined,
            byte_ids,
            unk: unk.context("no unknown piece (<unk>)")?,
            byte_fallback: t.byte_fallback,
            trainer_ids: [in_range(t.bos_id), in_range(t.eos_id), in_range(t.pad_id)],
            unk_surface: t.unk_surface.clone(),
            add_dummy_prefix: n.add_dummy_prefix,
            remove_extra_whitespaces: n.remove_extra_whitespaces,
            escape_whitespaces: n.escape_whitespaces,
            pieces: proto.pieces,
        })
    }

    /// Number of pieces, appended tokens included.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// BOS, EOS and pad ids from the trainer spec (`-1` or out of range means none).
    pub fn bos(&self) -> Option<u32> {
        self.trainer_ids[0]
    }
    pub fn eos(&self) -> Option<u32> {
        self.trainer_ids[1]
    }
    pub fn pad(&self) -> Option<u32> {
        self.trainer_ids[2]
    }

    /// Every piece (appended tokens included) with its score and its `ModelProto.SentencePiece.Type`
    /// number: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6 (GGUF's token types).
    pub fn pieces(&self) -> impl Iterator<Item = (&str, f32, i32)> + '_ {
        self.pieces.iter().map(|p| {
            let kind = match p.kind {
                Kind::Normal => 1,
                Kind::Unknown => 2,
                Kind::Control => 3,
                Kind::UserDefined => 4,
                Kind::Unused => 5,
                Kind::Byte(_) => 6,
            };
            (p.text.as_str(), p.score, kind)
        })
    }

    /// Whether encoding puts a space before the text (`normalizer_spec.add_dummy_prefix`).
    pub fn adds_dummy_prefix(&self) -> bool {
        self.add_dummy_prefix
    }

    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| p.text.as_str())
    }

    /// Appends a token after the vocabulary (Hugging Face added tokens such as `<pad>`). Special ones decode
    /// to nothing like CONTROL pieces; the others decode to their text like USER_DEFINED pieces. They never
    /// take part in BPE: the caller splits them out of the text before encoding.
    pub fn push_token(&mut self, text: &str, special: bool) -> Result<u32> {
        let id = u32::try_from(self.pieces.len())?;
        ensure!(!self.ids.contains_key(text), "token {text:?} is already in the vocabulary");
        self.ids.insert(text.to_string(), id);
        let kind = if special { Kind::Control } else { Kind::UserDefined };
        self.pieces.push(Piece { text: text.to_string(), score: 0.0, kind });
        Ok(id)
    }

    /// Encodes `text`, appending its ids to `out`, each with the byte range of `text` it came from shifted
    /// by `base` (a byte token covers its whole character). `at_start` says whether the text begins the
    /// input, the only place the dummy-prefix space goes (its range is empty at the first character).
    pub fn encode(&self, text: &str, at_start: bool, base: usize, out: &mut super::Encoding) {
        let (normalized, origin) = self.normalize(text, at_start);
        let mut is_prev_unk = false;
        for (piece, id) in self.bpe(&normalized) {
            let start = piece.as_ptr() as usize - normalized.as_ptr() as usize;
            let range = base + origin[start]..base + origin[start + piece.len()];
            let is_unk = id == self.unk;
            if is_unk && self.byte_fallback {
                for b in piece.bytes() {
                    out.push(self.byte_ids[usize::from(b)].unwrap_or(self.unk), range.clone());
                }
            } else if !(is_unk && is_prev_unk) {
                // Without byte fallback a run of unknown symbols becomes a single <unk>.
                out.push(id, range);
            } else if let Some(last) = out.offsets.last_mut() {
                last.end = range.end;
            }
            is_prev_unk = is_unk;
        }
    }

    /// `Normalizer::Normalize` with an identity character map; also, for each byte of the result and one
    /// past its end, the byte of `text` it came from.
    fn normalize(&self, text: &str, at_start: bool) -> (String, Vec<usize>) {
        let trimmed = if self.remove_extra_whitespaces { text.trim_start_matches(' ') } else { text };
        if trimmed.is_empty() {
            return (String::new(), vec![text.len()]);
        }
        let skipped = text.len() - trimmed.len();
        let space = if self.escape_whitespaces { SPACE } else { " " };
        let mut out = String::with_capacity(trimmed.len() + 2 * SPACE.len());
        let mut origin = Vec::with_capacity(out.capacity() + 1);
        let mut push = |out: &mut String, s: &str, at: usize| {
            out.push_str(s);
            origin.resize(out.len(), at);
        };
        if self.add_dummy_prefix && at_start {
            push(&mut out, SPACE, skipped);
        }
        let mut is_prev_space = self.remove_extra_whitespaces;
        for (i, c) in trimmed.char_indices() {
            if c != ' ' {
                push(&mut out, c.encode_utf8(&mut [0; 4]), skipped + i);
                is_prev_space = false;
            } else if !(is_prev_space && self.remove_extra_whitespaces) {
                push(&mut out, space, skipped + i);
                is_prev_space = true;
            }
        }
        if self.remove_extra_whitespaces {
            while let Some(rest) = out.strip_suffix(space) {
                out.truncate(rest.len());
            }
            origin.truncate(out.len());
        }
        origin.push(text.len());
        (out, origin)
    }

    /// Id of a piece that BPE may produce by merging (`pieces_` in model_interface.cc).
    fn mergeable(&self, piece: &str) -> Option<u32> {
        let id = *self.ids.get(piece)?;
        matches!(self.pieces[id as usize].kind, Kind::Normal | Kind::UserDefined | Kind::Unused).then_some(id)
    }

    /// `bpe::Model::SampleEncode` without dropout: the final symbols and their ids (unk when unknown).
    fn bpe<'t>(&self, normalized: &'t str) -> Vec<(&'t str, u32)> {
        struct Symbol {
            start: usize,
            end: usize,
            prev: Option<usize>,
            next: Option<usize>,
            frozen: bool,
        }
        let mut symbols = Vec::with_capacity(normalized.len());
        let mut start = 0;
        while start < normalized.len() {
            let rest = &normalized[start..];
            let user = self.user_defined.iter().find(|u| rest.starts_with(u.as_str()));
            let len = match user {
                Some(u) => u.len(),
                None => rest.chars().next().expect("rest is not empty").len_utf8(),
            };
            let i = symbols.len();
            let next = (start + len < normalized.len()).then_some(i + 1);
            symbols.push(Symbol { start, end: start + len, prev: i.checked_sub(1), next, frozen: user.is_some() });
            start += len;
        }

        // Merges of UNUSED pieces are undone at the end: piece -> the two symbols it was merged from.
        let mut rev_merge: HashMap<&str, (&str, &str)> = HashMap::new();
        let mut agenda = BinaryHeap::new();
        let mut add_pair =
            |symbols: &[Symbol], agenda: &mut BinaryHeap<Pair>, left: Option<usize>, right: Option<usize>| {
                let (Some(l), Some(r)) = (left, right) else { return };
                let (ls, rs) = (&symbols[l], &symbols[r]);
                if ls.frozen || rs.frozen {
                    return;
                }
                let piece = &normalized[ls.start..rs.end];
                let Some(id) = self.mergeable(piece) else { return };
                agenda.push(Pair { score: self.pieces[id as usize].score, left: l, right: r, len: piece.len() });
                if self.pieces[id as usize].kind == Kind::Unused {
                    rev_merge.insert(piece, (&normalized[ls.start..ls.end], &normalized[rs.start..rs.end]));
                }
            };
        for i in 1..symbols.len() {
            add_pair(&symbols, &mut agenda, Some(i - 1), Some(i));
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (&symbols[top.left], &symbols[top.right]);
            // Lazy invalidation: the pair is stale when either side was merged away or grew since.
            if l.start == l.end || r.start == r.end || (l.end - l.start) + (r.end - r.start) != top.len {
                continue;
            }
            let (r_end, r_next) = (r.end, r.next);
            symbols[top.left].end = r_end;
            symbols[top.left].next = r_next;
            if let Some(n) = r_next {
                symbols[n].prev = Some(top.left);
            }
            symbols[top.right].end = symbols[top.right].start;
            add_pair(&symbols, &mut agenda, symbols[top.left].prev, Some(top.left));
            add_pair(&symbols, &mut agenda, Some(top.left), r_next);
        }

        let mut out = Vec::with_capacity(symbols.len());
        let mut index = (!symbols.is_empty()).then_some(0);
        while let Some(i) = index {
            self.resegment(&normalized[symbols[i].start..symbols[i].end], &rev_merge, &mut out);
            index = symbols[i].next;
        }
        out
    }

    fn resegment<'t>(
        &self,
        piece: &'t str,
        rev_merge: &HashMap<&str, (&'t str, &'t str)>,
        out: &mut Vec<(&'t str, u32)>,
    ) {
        let id = self.ids.get(piece).copied().unwrap_or(self.unk);
        if self.pieces[id as usize].kind != Kind::Unused {
            return out.push((piece, id));
        }
        match rev_merge.get(piece) {
            Some(&(left, right)) => {
                self.resegment(left, rev_merge, out);
                self.resegment(right, rev_merge, out);
            }
            // A single character that is an UNUSED piece: sentencepiece (v0.2) encodes it as unknown.
            None => out.push((piece, self.unk)),
        }
    }

    /// `SentencePieceProcessor::Decode`: runs of byte pieces become UTF-8 (each invalid byte U+FFFD),
    /// control pieces vanish, <unk> shows as the unk surface (" ⁇ "), and the dummy-prefix space of the
    /// first piece is dropped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut text = String::new();
        let mut bytes = Vec::new();
        let (mut is_bos_ws, mut bos_ws_seen) = (true, false);
        let strip_bos_ws = self.add_dummy_prefix || self.remove_extra_whitespaces;
        for &id in ids {
            let piece = self
                .pieces
                .get(id as usize)
                .ok_or_else(|| anyhow!("token id {id} is out of range for a vocabulary of {}", self.pieces.len()))?;
            if let Kind::Byte(b) = piece.kind {
                bytes.push(b);
                continue;
            }
            push_utf8_lossy(&mut text, &bytes);
            bytes.clear();
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            bos_ws_seen = false;
            match piece.kind {
                Kind::Control => {}
                Kind::Unknown => text.push_str(&self.unk_surface),
                _ => {
                    let mut p = piece.text.as_str();
                    if is_bos_ws && strip_bos_ws {
                        if let Some(rest) = p.strip_prefix(SPACE) {
                            p = rest;
                            // With remove_extra_whitespaces every leading space goes, not just one.
                            bos_ws_seen = !self.remove_extra_whitespaces;
                        }
                    }
                    text.push_str(&p.replace(SPACE, " "));
                }
            }
        }
        push_utf8_lossy(&mut text, &bytes);
        Ok(text)
    }
}

/// Appends `bytes` as UTF-8, each byte that does not start a valid character becoming U+FFFD (one per
/// byte, as sentencepiece does; `String::from_utf8_lossy` would fold a truncated sequence into one).
fn push_utf8_lossy(text: &mut String, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        match std::str::from_utf8(bytes) {
            Ok(s) => return text.push_str(s),
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                text.push_str(std::str::from_utf8(valid).expect("checked valid"));
                text.push('\u{FFFD}');
                bytes = &rest[1..];
            }
        }
    }
}

/// A candidate merge of two adjacent symbols. The heap pops the highest score, then the leftmost.
#[derive(Debug)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Ord for Pair {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal).then(other.left.cmp(&self.left))
    }
}
impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pair {}

/// The parts of `ModelProto` that encoding and decoding depend on, with protobuf's defaults.
struct ModelProto {
    pieces: Vec<Piece>,
    trainer: TrainerSpec,
    normalizer: NormalizerSpec,
    denormalizer: NormalizerSpec,
}

struct TrainerSpec {
    model_type: u64,
    treat_whitespace_as_suffix: bool,
    byte_fallback: bool,
    bos_id: i32,
    eos_id: i32,
    pad_id: i32,
    unk_surface: String,
}

struct NormalizerSpec {
    name: String,
    precompiled_charsmap: Vec<u8>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        NormalizerSpec {
            name: String::new(),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

impl ModelProto {
    fn parse(bytes: &[u8]) -> Result<ModelProto> {
        let mut proto = ModelProto {
            pieces: Vec::new(),
            trainer: TrainerSpec {
                model_type: 1, // UNIGRAM
                treat_whitespace_as_suffix: false,
                byte_fallback: false,
                bos_id: 1,
                eos_id: 2,
                pad_id: -1,
                unk_surface: " \u{2047} ".to_string(),
            },
            normalizer: NormalizerSpec::default(),
            denormalizer: NormalizerSpec::default(),
        };
        let mut r = Reader { buf: bytes, pos: 0 };
        // Repeated occurrences of a message field merge into one, as in protobuf.
        while let Some((field, v)) = r.field()? {
            match field {
                1 => {
                    let piece =
                        parse_piece(v.bytes("pieces")?).with_context(|| format!("piece {}", proto.pieces.len()))?;
                    proto.pieces.push(piece);
                }
                2 => parse_trainer(v.bytes("trainer_spec")?, &mut proto.trainer).context("trainer_spec")?,
                3 => parse_normalizer(v.bytes("normalizer_spec")?, &mut proto.normalizer).context("normalizer_spec")?,
                5 => parse_normalizer(v.bytes("denormalizer_spec")?, &mut proto.denormalizer)
                    .context("denormalizer_spec")?,
                _ => {}
            }
        }
        Ok(proto)
    }
}

fn parse_piece(bytes: &[u8]) -> Result<Piece> {
    let (mut text, mut score, mut kind) = (String::new(), 0.0, 1);
    let mut r = Reader { buf: bytes, pos: 0 };
    while let Some((field, v)) = r.field()? {
        match field {
            1 => text = v.string("piece")?,
            2 => score = f32::from_bits(v.fixed32("score")?),
            3 => kind = v.varint("type")?,
            _ => {}
        }
    }
    let kind = match kind {
        1 => Kind::Normal,
        2 => Kind::Unknown,
        3 => Kind::Control,
        4 => Kind::UserDefined,
        5 => Kind::Unused,
        6 => Kind::Byte(
            text.strip_prefix("<0x")
                .and_then(|s| s.strip_suffix('>'))
                .filter(|h| h.len() == 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .with_context(|| format!("byte piece {text:?} is not of the form <0xXX>"))?,
        ),
        k => bail!("piece {text:?} has unknown type {k}"),
    };
    ensure!(!text.is_empty(), "empty piece");
    Ok(Piece { text, score, kind })
}

fn parse_trainer(bytes: &[u8], t: &mut TrainerSpec) -> Result<()> {
    let mut r = Reader { buf: bytes, pos: 0 };
    while let Some((field, v)) = r.field()? {
        match field {
            3 => t.model_type = v.varint("model_type")?,
            24 => t.treat_whitespace_as_suffix = v.varint("treat_whitespace_as_suffix")? != 0,
            35 => t.byte_fallback = v.varint("byte_fallback")? != 0,
            // int32 fields: negative values arrive sign-extended to 64 bits.
            41 => t.bos_id = v.varint("bos_id")? as i32,
            42 => t.eos_id = v.varint("eos_id")? as i32,
            43 => t.pad_id = v.varint("pad_id")? as i32,
            44 => t.unk_surface = v.string("unk_surface")?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer(bytes: &[u8], n: &mut NormalizerSpec) -> Result<()> {
    let mut r = Reader { buf: bytes, pos: 0 };
    while let Some((field, v)) = r.field()? {
        match field {
            1 => n.name = v.string("name")?,
            2 => n.precompiled_charsmap = v.bytes("precompiled_charsmap")?.to_vec(),
            3 => n.add_dummy_prefix = v.varint("add_dummy_prefix")? != 0,
            4 => n.remove_extra_whitespaces = v.varint("remove_extra_whitespaces")? != 0,
            5 => n.escape_whitespaces = v.varint("escape_whitespaces")? != 0,
            _ => {}
        }
    }
    Ok(())
}

/// One protobuf field value; the fixed64 and group values of unknown fields are skipped, not kept.
enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
    Skipped,
}

impl<'a> Value<'a> {
    fn varint(self, name: &str) -> Result<u64> {
        match self {
            Value::Varint(v) => Ok(v),
            _ => bail!("field {name} is not a varint"),
        }
    }
    fn fixed32(self, name: &str) -> Result<u32> {
        match self {
            Value::Fixed32(v) => Ok(v),
            _ => bail!("field {name} is not a fixed32"),
        }
    }
    fn bytes(self, name: &str) -> Result<&'a [u8]> {
        match self {
            Value::Bytes(b) => Ok(b),
            _ => bail!("field {name} is not length-delimited"),
        }
    }
    fn string(self, name: &str) -> Result<String> {
        Ok(std::str::from_utf8(self.bytes(name)?).with_context(|| format!("field {name} is not UTF-8"))?.to_string())
    }
}

/// Protobuf wire-format reader over one message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64> {
        let mut v = 0;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or_else(|| anyhow!("truncated varint at byte {}", self.pos))?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes before byte {}", self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let left = self.buf.len() - self.pos;
        ensure!(n <= left, "truncated: a field at byte {} needs {n} bytes, {left} are left", self.pos);
        self.pos += n;
        Ok(&self.buf[self.pos - n..self.pos])
    }

    /// The next field number and value, or None at the end of the message.
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>> {
        if self.pos == self.buf.len() {
            return Ok(None);
        }
        let at = self.pos;
        let key = self.varint()?;
        let (field, wire) = (key >> 3, key & 7);
        ensure!(field != 0 && wire != 4, "invalid field key {key} at byte {at}");
        Ok(Some((field, self.value(field, wire)?)))
    }

    fn value(&mut self, field: u64, wire: u64) -> Result<Value<'a>> {
        Ok(match wire {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Skipped
            }
            2 => {
                let n = self.varint()?;
                Value::Bytes(self.take(usize::try_from(n)?)?)
            }
            3 => {
                self.skip_group(field)?;
                Value::Skipped
            }
            5 => Value::Fixed32(u32::from_le_bytes(self.take(4)?.try_into()?)),
            _ => bail!("invalid wire type {wire} before byte {}", self.pos),
        })
    }

    /// Skips a (deprecated) group up to its matching end-group key, nested groups included. Iterative, with
    /// the open groups on a heap stack: a file of nested group keys must not recurse once per level.
    fn skip_group(&mut self, field: u64) -> Result<()> {
        let mut open = vec![field];
        while let Some(&inner) = open.last() {
            let key = self.varint()?;
            match (key >> 3, key & 7) {
                (f, 4) if f == inner => {
                    open.pop();
                }
                (_, 4) => bail!("mismatched end of group {inner} before byte {}", self.pos),
                (f, 3) => open.push(f),
                (f, wire) => {
                    self.value(f, wire)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Protobuf encoding helpers to build small models by hand.
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push(v as u8 | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn field_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    }
    fn field_varint(field: u64, v: u64, out: &mut Vec<u8>) {
        varint(field << 3, out);
        varint(v, out);
    }
    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut p = Vec::new();
        field_bytes(1, text.as_bytes(), &mut p);
        varint(2 << 3 | 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        field_varint(3, kind, &mut p);
        p
    }

    /// A tiny BPE model: unk/bos/eos, bytes for 'A' only, and some merges including an UNUSED one.
    fn tiny(normalizer: &[u8], extra: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        let pieces: &[(&str, f32, u64)] = &[
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("<0x41>", 0.0, 6),
            ("▁a", -1.0, 1),
            ("bc", -2.0, 1),
            ("▁abc", -3.0, 1),
            ("ab", -1.5, 5), // UNUSED: merged, then split back
            ("▁", -10.0, 1),
            ("a", -11.0, 1),
            ("b", -12.0, 1),
            ("c", -13.0, 1),
            ("<x>", 0.0, 4),
            ("d", -14.0, 5), // UNUSED single character: unknown
        ];
        for &(t, s, k) in pieces {
            field_bytes(1, &piece(t, s, k), &mut m);
        }
        let mut trainer = Vec::new();
        field_varint(3, 2, &mut trainer);
        field_varint(35, 1, &mut trainer);
        field_varint(43, u64::MAX, &mut trainer); // pad_id -1
        trainer.extend_from_slice(extra);
        field_bytes(2, &trainer, &mut m);
        field_bytes(3, normalizer, &mut m);
        m
    }

    fn identity(remove_extra_whitespaces: bool) -> Vec<u8> {
        let mut n = Vec::new();
        field_bytes(1, b"identity", &mut n);
        field_varint(4, remove_extra_whitespaces as u64, &mut n);
        n
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let m = Model::parse(&tiny(&identity(false), &[])).unwrap();
        let enc = |s: &str, at_start| {
            let mut out = crate::tokenizer::Encoding::default();
            m.encode(s, at_start, 0, &mut out);
            out.ids
        };
        assert_eq!(enc("abc", true), [6]); // ▁a + bc -> ▁abc
        assert_eq!(enc("", true), Vec::<u32>::new());
        // Without the dummy prefix "ab" (UNUSED) wins over "bc", then is split back into a, b.
        assert_eq!(enc("abc", false), [9, 10, 11]);
        // An UNUSED single character is unknown; there is no byte piece for 'd', and with byte fallback
        // on, unknowns are not merged.
        assert_eq!(enc("dd", false), [0, 0]);
        // <x> is user-defined; 'A' has a byte piece, 'Z' does not.
        assert_eq!(enc("<x>AZ", true), [8, 12, 3, 0]);
        assert_eq!(m.decode(&[1, 6, 8, 12, 3, 0, 2]).unwrap(), "abc <x>A ⁇ ");
        assert_eq!(m.decode(&[8, 8, 4]).unwrap(), "  a");
        assert_eq!((m.bos(), m.eos(), m.pad()), (Some(1), Some(2), None));
    }

    #[test]
    fn removes_extra_whitespaces_when_asked() {
        let m = Model::parse(&tiny(&identity(true), &[])).unwrap();
        // Each normalized byte maps to the input byte it came from, and one past the end to the input's end.
        assert_eq!(m.normalize("  a  b ", true), ("▁a▁b".into(), vec![2, 2, 2, 2, 3, 3, 3, 5, 7]));
        assert_eq!(m.normalize("   ", true), (String::new(), vec![3]));
        let keep = Model::parse(&tiny(&identity(false), &[])).unwrap();
        assert_eq!(keep.normalize(" a  b", true).0, "▁▁a▁▁b");
        assert_eq!(keep.normalize(" a", false), ("▁a".into(), vec![0, 0, 0, 1, 2]));
    }

    #[test]
    fn decodes_invalid_bytes_like_sentencepiece() {
        let mut s = String::new();
        push_utf8_lossy(&mut s, &[0xE2, 0x82, b'A', 0xF0, 0x9F, 0x90, 0x82, 0xFF]);
        assert_eq!(s, "\u{FFFD}\u{FFFD}A🐂\u{FFFD}");
    }

    #[test]
    fn skips_unknown_fields_of_every_wire_type() {
        let mut extra = Vec::new();
        varint(100 << 3 | 1, &mut extra); // fixed64
        extra.extend_from_slice(&[0; 8]);
        varint(101 << 3 | 3, &mut extra); // group with a nested group and a varint
        varint(102 << 3 | 3, &mut extra);
        varint(102 << 3 | 4, &mut extra);
        field_varint(7, 300, &mut extra);
        varint(101 << 3 | 4, &mut extra);
        varint(103 << 3 | 5, &mut extra); // fixed32
        extra.extend_from_slice(&[0; 4]);
        field_bytes(104, b"unknown", &mut extra);
        let m = Model::parse(&tiny(&identity(false), &extra)).unwrap();
        assert_eq!(m.vocab_size(), 14);
    }

    #[test]
    fn deeply_nested_groups_neither_recurse_nor_load() {
        // 200k nested start-group keys of field 1 (byte 0x0b): once a stack overflow per level.
        let err = Model::parse(&vec![0x0b; 200_000]).unwrap_err();
        assert!(format!("{err:#}").contains("truncated varint"), "{err:#}");
        // Closed properly, the same depth is an ordinary (skipped) unknown field.
        let mut extra = vec![(101 << 3 | 3) as u8 | 0x80, 6];
        let depth = 100_000;
        extra.extend(std::iter::repeat_n(0x0b, depth));
        extra.extend(std::iter::repeat_n(0x0c, depth));
        extra.extend([(101 << 3 | 4) as u8 | 0x80, 6]);
        assert_eq!(Model::parse(&tiny(&identity(false), &extra)).unwrap().vocab_size(), 14);
    }

    #[test]
    fn rejects_unsupported_models() {
        let mut n = Vec::new();
        field_bytes(1, b"nmt_nfkc", &mut n);
        field_bytes(2, &[1, 2, 3], &mut n);
        let err = format!("{:#}", Model::parse(&tiny(&n, &[])).unwrap_err());
        assert!(err.contains("nmt_nfkc"), "{err}");
        let mut unigram = Vec::new();
        field_varint(3, 1, &mut unigram); // a later model_type overrides the first
        let err = format!("{:#}", Model::parse(&tiny(&identity(false), &unigram)).unwrap_err());
        assert!(err.contains("only BPE"), "{err}");
        let full = tiny(&identity(false), &[]);
        for cut in [1, 5, full.len() / 2, full.len() - 1] {
            assert!(Model::parse(&full[..cut]).is_err(), "cut at {cut}");
        }
    }
}
