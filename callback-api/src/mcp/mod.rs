//! The MCP gateway: the tools of a tenant's registered connections, offered to the tenant's
//! sidecars over MCP (`/mcp`) and the seed's REST form, and run against each connection's
//! upstream MCP server with the tenant's credentials, which never enter a pod.

pub mod gateway;
pub mod protocol;
pub mod upstream;

pub use gateway::{CallError, CallOutcome, Caller, Context, Gateway, GatewaySettings, Outcome};
