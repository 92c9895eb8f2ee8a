//! VERSION: the spec versions the plugin speaks.

use serde_json::json;

use crate::types::SUPPORTED_VERSIONS;

pub(crate) fn version() -> serde_json::Value {
    json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS })
}
