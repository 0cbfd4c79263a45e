//! Root package of the workspace. It holds no product code: its `tests/` folder runs the
//! end-to-end tests that spawn the real `launcher` and `trainer` binaries.
