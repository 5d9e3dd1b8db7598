//! The Bessie chat template, exactly as the original project's training data renders it:
//!
//! ```text
//! \n{system}\n\nUser:\n{prompt}\n\nBessie:\n{response}\n🐂\n
//! ```
//!
//! Tokenized with BOS and without EOS. For generation the text ends after `\nBessie:\n`: the original
//! stopped after `User:\n{prompt}\n` and let the model write `Bessie:` itself, which wastes tokens and
//! sometimes derails; ending with the speaker tag is the fix SEED.md recommends.

/// The system prompt of the released Bessie model.
pub const BESSIE_SYSTEM_PROMPT: &str = "You are Bessie, created by Oxen.ai. You are happy to help with writing, analysis, question answering, math, coding, and all sorts of other tasks. You give concise responses to simple questions or statements, but provide thorough responses to more complex and open-ended questions. Answer the user's query as best as you can, and say \"I don't know\" if you don't know the answer.";

/// The ox emoji marks the end of a response; generation stops when it appears.
pub const END_MARKER: &str = "🐂";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    pub system: String,
}

impl Default for ChatTemplate {
    fn default() -> Self {
        Self { system: BESSIE_SYSTEM_PROMPT.to_string() }
    }
}

impl ChatTemplate {
    pub fn new(system: Option<&str>) -> Self {
        system.map_or_else(Self::default, |s| Self { system: s.to_string() })
    }

    /// The text a model is asked to continue: everything up to and including `\nBessie:\n`.
    pub fn generation_prompt(&self, prompt: &str) -> String {
        format!("\n{}\n\nUser:\n{prompt}\n\nBessie:\n", self.system)
    }

    /// A whole training example: the generation prompt, the response and the end marker.
    pub fn render(&self, prompt: &str, response: &str) -> String {
        format!("{}{response}\n{END_MARKER}\n", self.generation_prompt(prompt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_original_template_byte_for_byte() {
        let t = ChatTemplate::default();
        let expected = "\nYou are Bessie, created by Oxen.ai. You are happy to help with writing, analysis, question answering, math, coding, and all sorts of other tasks. You give concise responses to simple questions or statements, but provide thorough responses to more complex and open-ended questions. Answer the user's query as best as you can, and say \"I don't know\" if you don't know the answer.\n\nUser:\nWhat is 2+2?\n\nBessie:\n4\n🐂\n";
        assert_eq!(t.render("What is 2+2?", "4"), expected);
        assert!(expected.starts_with(&t.generation_prompt("What is 2+2?")));
        assert!(t.generation_prompt("x").ends_with("\n\nBessie:\n"));
    }

    #[test]
    fn system_prompt_is_replaceable() {
        let t = ChatTemplate::new(Some("Be brief."));
        assert_eq!(t.render("hi", "hello"), "\nBe brief.\n\nUser:\nhi\n\nBessie:\nhello\n🐂\n");
    }
}
