//! Wire protocol v1: request and reply frames, events, error codes and id rules.
//!
//! Pure data and validation; no I/O. `docs/PROTOCOL.md` is the human-readable
//! form of this module and must change with it.

mod error;
mod frames;
mod ids;
mod replies;

pub use error::{ErrorCode, ProtocolError};
pub use frames::{
    decode_request, AckRequest, AddMembersRequest, Body, ConvKind, ConvSummary,
    ConversationsRequest, CreateGroupRequest, Entry, HelloRequest, HistoryRequest, LeaveRequest,
    MediaRef, MemberAction, OpenDirectRequest, PollRequest, PresenceRequest, PresenceState,
    Receipt, RemoveMembersRequest, Request, SendRequest, ServerFrame, SyncRequest,
    PROTOCOL_VERSION,
};
pub use ids::{validate_conv_id, validate_device_id, validate_message_id, validate_user_id};
pub use replies::{encode, ErrorBody, MediaStored, PollReply, Reply};
