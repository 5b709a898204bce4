//! `ferry.toml` as an operator (or a damaged disk) leaves it, pairing
//! tokens, fault rules and the size and duration units.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = toml::from_str::<ferry::config::Config>(s) {
        let _ = c.validate();
    }
    let _ = ferry::transport::pairing::Token::decode(s);
    let _ = ferry::fsio::Rule::parse(s);
    let _ = s.parse::<ferry::units::ByteSize>();
    let _ = s.parse::<ferry::units::Dur>();
});
