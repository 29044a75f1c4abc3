//! HTTP plumbing shared by the registry (`registry`), plain-HTTP (`http`) and S3 (`s3`)
//! backends, in four modules:
//! - `client`: the agent and its configuration (timeouts, pace of bodies, retries, read from
//!   the environment), its cancel, the mapping of failures to `RemoteError`, whole bodies;
//! - `ranges`: range requests (one range with resuming retries, several in one request with a
//!   fallback range by range) and `Content-Range`;
//! - `multipart`: answers to multi-range requests and the `multipart/byteranges` parser;
//! - `auth`: `WWW-Authenticate` challenges and `Basic`/`Bearer` authorization values.
//!
//! The items backends use are re-exported here.

pub mod auth;
pub mod client;
pub mod multipart;
pub mod ranges;

pub use auth::{Challenge, basic_authorization, bearer_authorization, parse_www_authenticate};
pub use client::{
    HttpClient, HttpConfig, ProgressReader, body_error, body_to_file, content_length, error_body, header,
    query_escape, read_body, retry_after, status_error, transport_error,
};
pub use multipart::{byteranges_boundary, read_byteranges, stream_multi_range_body};
pub use ranges::{
    multi_range_header, parse_content_range, stream_body, stream_range, stream_range_body, stream_ranges,
};
