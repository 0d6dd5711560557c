//! Placeholder; filled by the test-guest work.
