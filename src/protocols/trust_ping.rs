//! trust_ping 1.0: answer a ping when the sender asks for a response.

use super::{HandleError, Inbound, Mediator, Outcome};

pub fn ping(_m: &Mediator, ctx: &Inbound) -> Result<Outcome, HandleError> {
    ctx.require_conn()?;
    let wanted = ctx.msg["response_requested"].as_bool().unwrap_or(true);
    Ok(Outcome {
        replies: if wanted {
            vec![ctx.reply("ping_response")]
        } else {
            vec![]
        },
        ..Outcome::default()
    })
}
