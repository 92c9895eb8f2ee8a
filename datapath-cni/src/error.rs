//! CNI errors: a code from the spec, a message a person can act on, details.

use serde::Serialize;

/// Error codes of CNI spec 1.1, section "Error".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    IoFailure = 5,
    DecodeFailure = 6,
    InvalidNetworkConfig = 7,
    TryAgainLater = 11,
    PluginNotAvailable = 50,
    /// Plugin-specific (100+): the endpoint is not as ADD left it.
    EndpointDamaged = 100,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self { code: code as u32, msg: msg.into(), details: String::new() }
    }

    /// Keep the whole cause chain in `details`, not flattened into a string early.
    pub fn with_source(code: ErrorCode, msg: impl Into<String>, source: &dyn std::error::Error) -> Self {
        let mut details = source.to_string();
        let mut cause = source.source();
        while let Some(c) = cause {
            details.push_str(": ");
            details.push_str(&c.to_string());
            cause = c.source();
        }
        Self { code: code as u32, msg: msg.into(), details }
    }

    pub fn from_anyhow(code: ErrorCode, msg: impl Into<String>, error: &anyhow::Error) -> Self {
        Self { code: code as u32, msg: msg.into(), details: format!("{error:#}") }
    }

    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Wire<'a> {
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_value(Wire { cni_version, code: self.code, msg: &self.msg, details: &self.details })
            .unwrap_or_default()
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}
