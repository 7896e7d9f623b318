//! The error a request ends with: a protocol error code and a human message (spec §7).

use missive_spec::ErrorCode;

use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::InvalidRequest, message)
    }
    pub fn unauthorized() -> ApiError {
        ApiError::new(ErrorCode::Unauthorized, "missing, unknown or revoked access token")
    }
    pub fn internal() -> ApiError {
        ApiError::new(ErrorCode::Internal, "server fault; nothing was changed")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::error!(error = %e, "storage failure");
        ApiError::internal()
    }
}
