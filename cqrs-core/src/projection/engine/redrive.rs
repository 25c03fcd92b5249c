//! Operator work: dead letters applied again (a stream's in order), rebuilds, and the requests
//! recorded for the owner.

use crate::envelope::StreamId;
use crate::projection::Projection;
use crate::projection::failure::{Failure, LetterReason, Redrive};

use super::*;

impl<P, B> Engine<P, B>
where
    P: Projection,
    B: DeliveryBackend<P>,
{
    /// Applies the dead letters of `stream` again, in version order, in one unit (a page of
    /// letters at a time, each event read again from the store): each one that applies is
    /// removed; the first that fails again stays (with the new error) and so do the ones after
    /// it.
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`], a failing backend.
    pub async fn retry(&mut self, stream: &StreamId) -> Result<Redrive, DeliveryError> {
        self.owns()?;
        let mut unit = self.backend.begin_unit().await?;
        let outcome = self.retry_in(&mut unit, stream).await;
        self.end(unit, outcome).await
    }

    pub(super) async fn retry_in(
        &mut self,
        unit: &mut B::Unit,
        stream: &StreamId,
    ) -> Result<Redrive, DeliveryError> {
        self.backend.begin_redrive(unit, stream).await?;
        let mut redrive = Redrive::default();
        let mut after = None;
        loop {
            let letters = self
                .backend
                .letters_of(unit, stream, after, REDRIVE_PAGE)
                .await?;
            let last_page = letters.len() < REDRIVE_PAGE;
            for letter in letters {
                after = Some(letter.version);
                let failure = match self.backend.reread_letter(unit, &letter).await? {
                    Ok(event) => match self.apply_with_retries(unit, &event).await? {
                        Attempt::Applied | Attempt::Duplicate => None,
                        Attempt::Failed(failure) => Some(failure),
                    },
                    Err(error) => Some(Failure {
                        reason: LetterReason::Failed,
                        error,
                        attempts: 1,
                        first_failed_at: letter.first_failed_at,
                    }),
                };
                match failure {
                    None => {
                        self.backend.resolve_letter(unit, letter.id).await?;
                        redrive.applied += 1;
                    }
                    Some(failure) => {
                        self.backend
                            .fail_letter_again(unit, letter.id, &failure.error)
                            .await?;
                        redrive.failed += 1;
                        return Ok(redrive);
                    }
                }
            }
            if last_page {
                return Ok(redrive);
            }
        }
    }

    /// [`Engine::retry`] for every stream with dead letters.
    ///
    /// # Errors
    /// As [`Engine::retry`].
    pub async fn retry_all(&mut self) -> Result<Redrive, DeliveryError> {
        self.owns()?;
        let mut unit = self.backend.begin_unit().await?;
        let streams = self.backend.blocked_streams(&mut unit).await;
        self.backend.end_unit(unit, false).await?;
        let mut total = Redrive::default();
        for stream in streams? {
            let done = self.retry(&stream).await?;
            total.applied += done.applied;
            total.failed += done.failed;
        }
        Ok(total)
    }

    /// Rebuilds from the first event with the backend's reset (read model, checkpoint and dead
    /// letters in one unit), then catches up. Writers may keep writing meanwhile: the result
    /// equals a clean replay.
    ///
    /// # Errors
    /// As [`DeliveryBackend::reset_for_rebuild`] and [`Engine::catch_up`].
    pub async fn rebuild(&mut self) -> Result<usize, DeliveryError> {
        self.owns()?;
        let mut unit = self.backend.begin_unit().await?;
        let outcome = self.backend.reset_for_rebuild(&mut unit).await;
        self.end(unit, outcome).await?;
        tracing::info!(projection = P::NAME, "rebuilding from the first event");
        self.catch_up().await
    }

    /// Answers the operators' requests (see [`DeliveryBackend::pending_requests`]): a rebuild, then the
    /// dead letters asked to be retried, stream by stream. Returns whether there was anything to
    /// do.
    ///
    /// # Errors
    /// [`DeliveryError::LeaseLost`], a failing backend; a failed rebuild is recorded for the
    /// operator and returned.
    pub async fn serve_requests(&mut self) -> Result<bool, DeliveryError> {
        self.owns()?;
        let requests = self.backend.pending_requests().await?;
        let served = !requests.is_empty();
        for request in requests {
            match &request {
                Request::Rebuild => {
                    let outcome = self.rebuild().await.map(|_| ());
                    if let Err(error) = &outcome {
                        self.backend
                            .request_answered(&request, Err(error.to_string()))
                            .await?;
                    }
                    outcome?;
                }
                Request::Retry(stream) => {
                    let redrive = self.retry(stream).await?;
                    tracing::info!(projection = P::NAME, %stream, applied = redrive.applied, failed = redrive.failed, "dead letters retried on request");
                }
            }
        }
        Ok(served)
    }
}
