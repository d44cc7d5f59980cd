//! Nothing here: the tests in `tests/` drive the real keygate binary and its
//! dashboard in headless Chromium through chromedriver. They are `#[ignore]`d
//! so that `cargo test --workspace` does not need a browser; `.ci/browser.sh`
//! installs Chromium and runs them with `-- --ignored`.
#![forbid(unsafe_code)]
