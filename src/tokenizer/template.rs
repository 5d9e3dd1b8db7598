//! Chat templates: how a conversation becomes the text a model is trained on and prompted with.
//!
//! Two kinds, one renderer. A checkpoint's own template (`chat_template.jinja`, or `chat_template` in
//! `tokenizer_config.json`) is Jinja, rendered with minijinja the way transformers' `apply_chat_template`
//! renders it: `trim_blocks` and `lstrip_blocks`, loop controls, `raise_exception`, a `tojson` that writes
//! what Python's `json.dumps` writes, Python's string and dict methods, and the special tokens
//! (`bos_token`, `eos_token`, ...) as variables. The original project's Bessie template is written in the
//! same Jinja (`BESSIE`), so both kinds go through one code path:
//!
//! ```text
//! \n{system}\n\nUser:\n{prompt}\n\nBessie:\n{response}\n🐂\n
//! ```
//!
//! further turns continuing with `\nUser:\n...`. The Bessie text is tokenized with BOS (its template has no
//! BOS of its own); a checkpoint's template writes `bos_token` itself where it wants one, and its text is
//! tokenized without added special tokens, as transformers does. For generation the Bessie text ends after
//! `\nBessie:\n`: the original stopped after `User:\n{prompt}\n` and let the model write `Bessie:` itself,
//! which wastes tokens and sometimes derails; ending with the speaker tag is the fix SEED.md recommends.
//!
//! The tokens a model learns from are its assistant turns: `render_with_spans` finds each one as the text
//! between the conversation rendered up to it (with the generation prompt) and rendered through it, which
//! covers the reply and whatever closes it (`<|eot_id|>`, the 🐂 marker), as TRL's assistant-only loss does.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use super::Tokenizer;

/// The system prompt of the released Bessie model.
pub const BESSIE_SYSTEM_PROMPT: &str = "You are Bessie, created by Oxen.ai. You are happy to help with writing, analysis, question answering, math, coding, and all sorts of other tasks. You give concise responses to simple questions or statements, but provide thorough responses to more complex and open-ended questions. Answer the user's query as best as you can, and say \"I don't know\" if you don't know the answer.";

/// Where a checkpoint keeps its own chat template (transformers 5 saves it there too).
pub const TEMPLATE_FILE: &str = "chat_template.jinja";

/// The ox emoji marks the end of a Bessie response; generation stops when it appears.
pub const END_MARKER: &str = "🐂";

/// The Bessie template. The system prompt is the first message's when that is a system message, else
/// `default_system`: Bessie's own rendering always puts a system message first, and a checkpoint's
/// `chat_template.jinja` sets `default_system` in its first line (`standalone`), so transformers renders
/// what Bessie trained on.
const BESSIE: &str = r#"{%- if messages and messages[0].role == 'system' -%}
    {%- set system = messages[0].content -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system = default_system -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- if system is defined -%}
    {{- '\n' + system + '\n' -}}
{%- endif -%}
{%- for m in turns -%}
    {%- if m.role == 'user' -%}
        {{- '\nUser:\n' + m.content + '\n\nBessie:\n' -}}
    {%- elif m.role == 'assistant' -%}
        {{- m.content + '\n🐂\n' -}}
    {%- else -%}
        {{- raise_exception("the Bessie template takes a system message first, then user and assistant messages; not the role '" + m.role + "'") -}}
    {%- endif -%}
{%- endfor -%}"#;

/// The first line of a standalone Bessie template, around the default system prompt as a JSON string
/// (whose escapes Jinja's string literals share).
const DEFAULT_SYSTEM_LINE: [&str; 2] = ["{%- set default_system = ", " -%}\n"];

/// Template instructions one rendering may run: far beyond any real template on any real conversation,
/// and a bound on a hostile one.
const FUEL: u64 = 50_000_000;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string() }
    }
}

/// Which template a program uses (`data.template`, `--template`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateChoice {
    /// The checkpoint's own template when it has one, else Bessie's.
    Auto,
    /// The checkpoint's own template; an error when it has none.
    Checkpoint,
    Bessie,
    /// A Jinja file.
    File(PathBuf),
}

impl std::str::FromStr for TemplateChoice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => Self::Auto,
            "checkpoint" => Self::Checkpoint,
            "bessie" => Self::Bessie,
            "" => bail!("the chat template is empty: use auto, checkpoint, bessie or the path of a Jinja file"),
            path => Self::File(path.into()),
        })
    }
}

/// The special tokens a Jinja template sees as `bos_token`, `eos_token` and `pad_token`, as text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
}

impl SpecialTokens {
    pub fn of(tok: &Tokenizer) -> Self {
        let piece = |id: Option<u32>| id.and_then(|id| tok.id_to_piece(id));
        SpecialTokens { bos: piece(Some(tok.bos_id())), eos: piece(Some(tok.eos_id())), pad: piece(tok.pad_id()) }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for messages: "the Bessie template", a file.
    origin: String,
    /// The Jinja text, part of the data cache key.
    source: String,
    /// The variables every rendering sees besides `messages` and `add_generation_prompt`.
    globals: Value,
    /// The system message put first in conversations without one.
    system: Option<String>,
}

impl ChatTemplate {
    /// The original project's template, with `system` (or Bessie's) as the default system prompt.
    pub fn bessie(system: Option<&str>) -> Self {
        let mut t =
            Self::compile(BESSIE.to_string(), "the Bessie template".into()).expect("the Bessie template compiles");
        t.system = Some(system.unwrap_or(BESSIE_SYSTEM_PROMPT).to_string());
        t
    }

    /// A Jinja template from `origin` (for messages), with `special`'s tokens as its variables and
    /// `system` as the default system message.
    pub fn jinja(source: String, origin: String, special: &SpecialTokens, system: Option<&str>) -> Result<Self> {
        let mut t = Self::compile(source, origin)?;
        t.system = system.map(str::to_string);
        t.globals = minijinja::context! {
            bos_token => special.bos.clone(),
            eos_token => special.eos.clone(),
            pad_token => special.pad.clone(),
        };
        Ok(t)
    }

    /// The template `choice` names, for the checkpoint (or tokenizer directory) `dir` whose tokenizer is
    /// `tok`. `system` is the system message of conversations without one (for the Bessie template,
    /// Bessie's own system prompt when `None`).
    ///
    /// A checkpoint whose template is a standalone Bessie template (one Bessie saved after training with
    /// it) gets the Bessie template, with BOS and the 🐂 end marker, and its saved system prompt unless
    /// `system` replaces it.
    pub fn load(choice: &TemplateChoice, dir: &Path, tok: &Tokenizer, system: Option<&str>) -> Result<Self> {
        let own = |source: String, origin: String| match saved_bessie_system(&source) {
            Some(saved) => Ok(Self::bessie(Some(system.unwrap_or(&saved)))),
            None => Self::jinja(source, origin, &SpecialTokens::of(tok), system),
        };
        match choice {
            TemplateChoice::Bessie => Ok(Self::bessie(system)),
            TemplateChoice::Auto => match checkpoint_template(dir)? {
                Some((source, origin)) => own(source, origin),
                None => Ok(Self::bessie(system)),
            },
            TemplateChoice::Checkpoint => {
                let (source, origin) = checkpoint_template(dir)?.with_context(|| {
                    format!(
                        "{} has no chat template (neither chat_template.jinja nor a chat_template in \
                         tokenizer_config.json): choose the template bessie or a Jinja file",
                        dir.display()
                    )
                })?;
                own(source, origin)
            }
            TemplateChoice::File(path) => {
                let source = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the chat template {}", path.display()))?;
                Self::jinja(source, path.display().to_string(), &SpecialTokens::of(tok), system)
            }
        }
    }

    fn compile(source: String, origin: String) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.expect("the default delimiters"));
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.clone()).map_err(|e| anyhow!("{origin}: {}", describe(&e)))?;
        Ok(Self { env, origin, source, globals: Value::UNDEFINED, system: None })
    }

    /// The template as a file of its own, for a saved checkpoint's `chat_template.jinja`: the Jinja text,
    /// with the Bessie template's default system prompt written in, so transformers' `apply_chat_template`
    /// renders what Bessie trained on and Bessie reads it back as the Bessie template (`load`).
    pub fn standalone(&self) -> String {
        match (&self.system, self.is_bessie()) {
            (Some(system), true) => {
                let json = serde_json::to_string(system).expect("a string serializes");
                format!("{}{json}{}{BESSIE}", DEFAULT_SYSTEM_LINE[0], DEFAULT_SYSTEM_LINE[1])
            }
            _ => self.source.clone(),
        }
    }

    /// Where the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The Jinja text and the default system message: what the rendered text depends on besides the
    /// conversation (the data cache key).
    pub fn identity(&self) -> String {
        format!("{}\0{:?}", self.source, self.system)
    }

    /// Whether this is the Bessie template, which the rules below single out.
    fn is_bessie(&self) -> bool {
        self.source == BESSIE
    }

    /// Whether the rendered text is tokenized with BOS first: the Bessie text has none of its own.
    pub fn add_bos(&self) -> bool {
        self.is_bessie()
    }

    /// A text that ends a response besides the tokenizer's end-of-turn ids: 🐂 for the Bessie template.
    pub fn end_marker(&self) -> Option<&'static str> {
        self.is_bessie().then_some(END_MARKER)
    }

    /// The conversation as text; with `add_generation_prompt`, followed by what opens the assistant's reply.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let with_system;
        let messages = match &self.system {
            Some(system) if messages.first().is_none_or(|m| m.role != "system") => {
                with_system = [&[Message::new("system", system)], messages].concat();
                &with_system[..]
            }
            _ => messages,
        };
        let messages = Value::from(minijinja::value::Serde(messages));
        let ctx = minijinja::context! { messages, add_generation_prompt, ..self.globals.clone() };
        let template = self.env.get_template("chat").expect("compiled");
        template.render(ctx).map_err(|e| anyhow!("rendering the chat template ({}): {}", self.origin, describe(&e)))
    }

    /// The text a model continues to answer the last user message: the conversation and the generation prompt.
    pub fn generation_prompt(&self, messages: &[Message]) -> Result<String> {
        self.render(messages, true)
    }

    /// The token ids of `generation_prompt`, as training tokenized the same text.
    pub fn prompt_ids(&self, tok: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
        tok.encode(&self.generation_prompt(messages)?, self.add_bos())
    }

    /// The whole conversation as text, and the byte ranges of its assistant turns (each reply with what
    /// closes it). An error when a turn's text is not where rendering the conversation up to it puts it:
    /// such a template renders earlier turns differently once later ones follow, so no token span is its.
    pub fn render_with_spans(&self, messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
        let text = self.render(messages, false)?;
        let mut spans = Vec::new();
        for k in (0..messages.len()).filter(|&k| messages[k].role == "assistant") {
            let before = self.render(&messages[..k], true)?;
            // Through the last message is the whole text, rendered already.
            let through = if k + 1 == messages.len() { text.clone() } else { self.render(&messages[..=k], false)? };
            ensure!(
                through.starts_with(&before) && text.starts_with(&through),
                "{}: the text of assistant message {} depends on the messages after it, so its tokens cannot be \
                 told apart for the loss",
                self.origin,
                k + 1
            );
            spans.push(before.len()..through.len());
        }
        Ok((text, spans))
    }
}

/// The default system prompt of a standalone Bessie template (`ChatTemplate::standalone`); None for any
/// other text.
fn saved_bessie_system(source: &str) -> Option<String> {
    let line =
        source.strip_suffix(BESSIE)?.strip_prefix(DEFAULT_SYSTEM_LINE[0])?.strip_suffix(DEFAULT_SYSTEM_LINE[1])?;
    serde_json::from_str(line).ok()
}

/// The checkpoint's own template and where it came from: `chat_template.jinja` (what transformers 5
/// saves) or `chat_template` in `tokenizer_config.json` (a string, or a list of named templates of which
/// the one named "default" is used).
pub fn checkpoint_template(dir: &Path) -> Result<Option<(String, String)>> {
    let jinja = dir.join(TEMPLATE_FILE);
    if jinja.is_file() {
        let source = std::fs::read_to_string(&jinja).with_context(|| format!("reading {}", jinja.display()))?;
        return Ok(Some((source, jinja.display().to_string())));
    }
    let config = dir.join("tokenizer_config.json");
    if !config.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&config).with_context(|| format!("reading {}", config.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", config.display()))?;
    let origin = format!("chat_template in {}", config.display());
    let source = match json.get("chat_template") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .with_context(|| format!("{origin}: a list of templates without one named \"default\""))?
            .to_string(),
        Some(other) => bail!("{origin}: expected a string, not {other}"),
    };
    Ok(Some((source, origin)))
}

/// A minijinja error with its line, and its cause (the message of `raise_exception`).
fn describe(e: &Error) -> String {
    let mut text = match e.line() {
        Some(line) => format!("line {line}: {}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(detail) = e.detail() {
        text = format!("{text}: {detail}");
    }
    text
}

/// transformers' `tojson`: `json.dumps(value, ensure_ascii=False, indent=indent)`, whose separators are
/// `", "` and `": "` (minijinja's own escapes `<`, `>`, `&` and `'` for HTML, which Python's does not).
fn tojson(value: Value, indent: Option<usize>, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    use serde::Serialize;
    let indent = indent.or(kwargs.get::<Option<usize>>("indent")?);
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let result = match indent {
        Some(n) => {
            let indent = vec![b' '; n];
            value.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out,
                serde_json::ser::PrettyFormatter::with_indent(&indent),
            ))
        }
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonFormatter)),
    };
    result.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(String::from_utf8(out).expect("serde_json writes UTF-8")))
}

/// JSON with Python's default separators.
struct PythonFormatter;

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        self.begin_array_value(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(prompt: &str, response: &str) -> Vec<Message> {
        vec![Message::new("user", prompt), Message::new("assistant", response)]
    }

    #[test]
    fn renders_the_original_template_byte_for_byte() {
        let t = ChatTemplate::bessie(None);
        let expected = "\nYou are Bessie, created by Oxen.ai. You are happy to help with writing, analysis, question answering, math, coding, and all sorts of other tasks. You give concise responses to simple questions or statements, but provide thorough responses to more complex and open-ended questions. Answer the user's query as best as you can, and say \"I don't know\" if you don't know the answer.\n\nUser:\nWhat is 2+2?\n\nBessie:\n4\n🐂\n";
        assert_eq!(t.render(&turn("What is 2+2?", "4"), false).unwrap(), expected);
        let prompt = t.generation_prompt(&[Message::new("user", "What is 2+2?")]).unwrap();
        assert!(expected.starts_with(&prompt) && prompt.ends_with("\n\nBessie:\n"), "{prompt:?}");
    }

    #[test]
    fn system_prompt_is_replaceable() {
        let t = ChatTemplate::bessie(Some("Be brief."));
        assert_eq!(t.render(&turn("hi", "hello"), false).unwrap(), "\nBe brief.\n\nUser:\nhi\n\nBessie:\nhello\n🐂\n");
        let mut with_system = vec![Message::new("system", "Moo.")];
        with_system.extend(turn("hi", "hello"));
        assert_eq!(t.render(&with_system, false).unwrap(), "\nMoo.\n\nUser:\nhi\n\nBessie:\nhello\n🐂\n");
    }

    #[test]
    fn assistant_spans_cover_each_reply_and_its_marker() {
        let t = ChatTemplate::bessie(Some("S"));
        let mut m = turn("a", "b");
        m.extend(turn("c", "d"));
        let (text, spans) = t.render_with_spans(&m).unwrap();
        assert_eq!(text, "\nS\n\nUser:\na\n\nBessie:\nb\n🐂\n\nUser:\nc\n\nBessie:\nd\n🐂\n");
        let got: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(got, ["b\n🐂\n", "d\n🐂\n"]);
    }

    #[test]
    fn unknown_roles_and_bad_templates_are_errors_naming_the_template() {
        let t = ChatTemplate::bessie(None);
        let e = t.render(&[Message::new("tool", "x")], false).unwrap_err().to_string();
        assert!(e.contains("the Bessie template") && e.contains("'tool'"), "{e}");
        let e = ChatTemplate::compile("{% for %}".into(), "x.jinja".into()).err().unwrap().to_string();
        assert!(e.contains("x.jinja") && e.contains("line 1"), "{e}");
    }

    #[test]
    fn a_saved_bessie_template_renders_the_same_as_jinja_and_reads_back_as_bessie() {
        let system = "Say \"moo\",\n\tthen stop. Ünïcödé 🐂 \\ \u{1}";
        let t = ChatTemplate::bessie(Some(system));
        let saved = t.standalone();
        assert_eq!(saved_bessie_system(&saved).as_deref(), Some(system));
        // Rendered as plain Jinja (as transformers renders it), without a system message: the same text.
        let jinja = ChatTemplate::jinja(saved.clone(), "saved".into(), &SpecialTokens::default(), None).unwrap();
        let m = turn("hi", "hello");
        assert_eq!(jinja.render(&m, false).unwrap(), t.render(&m, false).unwrap());
        assert_eq!(jinja.generation_prompt(&m[..1]).unwrap(), t.generation_prompt(&m[..1]).unwrap());
        assert_eq!(saved_bessie_system(&(saved + " ")), None);
        assert_eq!(ChatTemplate::bessie(None).standalone().lines().count(), BESSIE.lines().count() + 1);
    }

    #[test]
    fn a_template_that_never_ends_runs_out_of_fuel() {
        let source = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::compile(source.into(), "loop.jinja".into()).unwrap();
        let e = t.render(&[], false).unwrap_err().to_string();
        assert!(e.contains("loop.jinja") && e.contains("fuel"), "{e}");
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let t = ChatTemplate::compile("{{ x | tojson }}|{{ x | tojson(indent=2) }}".into(), "t".into()).unwrap();
        let x = Value::from(minijinja::value::Serde(serde_json::json!({"a": [1, "<é>"], "b": {"c": null}})));
        let out = t.env.get_template("chat").unwrap().render(minijinja::context! { x }).unwrap();
        assert_eq!(out, "{\"a\": [1, \"<é>\"], \"b\": {\"c\": null}}|{\n  \"a\": [\n    1,\n    \"<é>\"\n  ],\n  \"b\": {\n    \"c\": null\n  }\n}");
    }
}
