//! Chat templates: the model's Jinja template (Hugging Face dialect)
//! compiled with minijinja, turning a conversation into prompt text.

use crate::error::{ModelError, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use std::time::{SystemTime, UNIX_EPOCH};

/// ChatML, for tokenizers that ship no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const TEMPLATE_NAME: &str = "chat_template";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

/// `raise_exception(msg)`: templates use it to reject a conversation.
fn raise_exception(message: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current UTC date/time (Llama 3.x templates
/// print today's date). Supports `%Y %y %m %d %e %b %B %H %M %S %%`.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    strftime(&format, secs)
}

/// The UTC calendar date (year, month 1-12, day 1-31) of a Unix time
/// (Howard Hinnant's `civil_from_days`).
pub fn civil_date(unix_secs: u64) -> (i64, i64, i64) {
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

fn strftime(format: &str, unix_secs: u64) -> std::result::Result<String, minijinja::Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_date(unix_secs);
    let month_name = MONTHS[(month - 1) as usize];

    let mut out = String::with_capacity(format.len() + 8);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &year.to_string(),
            Some('y') => out += &format!("{:02}", year.rem_euclid(100)),
            Some('m') => out += &format!("{month:02}"),
            Some('d') => out += &format!("{day:02}"),
            Some('e') => out += &format!("{day:2}"),
            Some('b') => out += &month_name[..3],
            Some('B') => out += month_name,
            Some('H') => out += &format!("{:02}", secs_of_day / 3600),
            Some('M') => out += &format!("{:02}", secs_of_day / 60 % 60),
            Some('S') => out += &format!("{:02}", secs_of_day % 60),
            Some('%') => out.push('%'),
            other => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: unsupported directive %{}", other.map(String::from).unwrap_or_default()),
                ))
            }
        }
    }
    Ok(out)
}

/// `json.dumps` spacing (`", "` and `": "`), which Hugging Face's `tojson`
/// uses; minijinja's own filter writes compact, HTML-escaped JSON, which
/// would change the prompt's tokens.
struct PythonJson;

impl serde_json::ser::Formatter for PythonJson {
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

/// `tojson(indent=None)` as in Hugging Face's template environment
/// (`json.dumps(x, ensure_ascii=False, indent=indent)`).
fn tojson(value: Value, indent: Option<usize>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent = match kwargs.get::<Option<usize>>("indent")? {
        Some(i) => Some(i),
        None => indent,
    };
    if kwargs.has("ensure_ascii") && kwargs.get::<bool>("ensure_ascii")? {
        return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: ensure_ascii=True is not supported"));
    }
    kwargs.assert_all_used()?;
    let mut out = Vec::new();
    let written = match indent {
        None => value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, PythonJson)),
        Some(n) => {
            let pad = vec![b' '; n];
            let formatter = serde_json::ser::PrettyFormatter::with_indent(&pad);
            value.serialize(&mut serde_json::Serializer::with_formatter(&mut out, formatter))
        }
    };
    written.map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(Value::from_safe_string(text))
}

impl ChatTemplate {
    /// Compiles a template with Hugging Face's settings (`trim_blocks`,
    /// `lstrip_blocks`, Python string methods, `raise_exception`,
    /// `strftime_now`, `json.dumps`-style `tojson`, loop controls).
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| ModelError::Config(format!("chat template does not compile: {}", describe(&e))))?;
        Ok(Self { env })
    }

    /// The ChatML fallback template.
    pub fn chatml() -> Self {
        Self::new(CHATML_TEMPLATE).expect("the built-in ChatML template compiles")
    }

    /// Renders a conversation. Errors raised by the template (for example
    /// "roles must alternate") are request errors.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ModelError::Config(format!("chat template: {}", describe(&e))))?;
        template
            .render(context! { messages, add_generation_prompt, bos_token, eos_token })
            .map_err(|e| ModelError::Request(format!("chat template failed: {}", describe(&e))))
    }
}

/// The error with its detail and location (minijinja puts the message of
/// `raise_exception` in the detail).
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s += &format!(": {inner}");
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::chatml();
        let out = t.render(&[ChatMessage::system("S"), ChatMessage::user("Hi")], true, "", "").unwrap();
        assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let out = t.render(&[ChatMessage::user("Hi")], false, "", "").unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n");
    }

    #[test]
    fn strftime_formats_known_dates() {
        // 2024-07-26 13:25:09 UTC.
        assert_eq!(strftime("%d %b %Y", 1_722_000_309).unwrap(), "26 Jul 2024");
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %B %y%%", 1_722_000_309).unwrap(), "2024-07-26 13:25:09 July 24%");
        assert_eq!(strftime("%Y-%m-%d", 951_782_400).unwrap(), "2000-02-29");
        assert_eq!(strftime("%e", 0).unwrap(), " 1");
        assert!(strftime("%Q", 0).is_err());
    }
}
