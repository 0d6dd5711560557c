//! Token-bucket rate limiting (next step).
