//! Base64 helpers shared by the module.
//!
//! Peers disagree on padding (ACA-Py pads, Credo does not) and a few old agents use the
//! standard alphabet, so decoding accepts all four combinations; encoding is always
//! unpadded base64url, what both real peers accept.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;

const URL_ANY: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const STD_ANY: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const URL_NOPAD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_encode_padding(false),
);
const URL_PAD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_encode_padding(true),
);

/// Decode base64 in either alphabet, padded or not. `None` on anything else.
pub(crate) fn decode(s: &str) -> Option<Vec<u8>> {
    URL_ANY.decode(s).ok().or_else(|| STD_ANY.decode(s).ok())
}

/// Unpadded base64url.
pub(crate) fn encode(b: &[u8]) -> String {
    URL_NOPAD.encode(b)
}

/// Padded base64url, for fields that old Python agents decode with `urlsafe_b64decode`.
pub(crate) fn encode_padded(b: &[u8]) -> String {
    URL_PAD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_all_variants() {
        // 0xfb 0xff encodes to "-_8" (url) / "+/8" (std); padded "-_8=".
        for s in ["-_8", "-_8=", "+/8", "+/8="] {
            assert_eq!(decode(s), Some(vec![0xfb, 0xff]), "{s}");
        }
        assert_eq!(encode(&[0xfb, 0xff]), "-_8");
        assert_eq!(encode_padded(&[0xfb, 0xff]), "-_8=");
        assert_eq!(decode("a"), None);
        assert_eq!(decode("!!!!"), None);
    }
}
