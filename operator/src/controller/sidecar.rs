//! The `OpencodeSidecar` controller: turns each sidecar into a running, isolated fleet of
//! OpenCode servers for one tenant.
//!
//! A reconcile is a pipeline: [`dereference`] reads the Secret that must survive (password,
//! recorded organization), [`validate`] (pure) applies defaults and refuses what cannot run,
//! [`build`] (pure) renders the children, [`apply`] server-side applies them, and [`status`]
//! reports replicas, pods and conditions. An invalid spec changes no child: it yields a Degraded
//! condition, a Warning event and `await_change`; transient errors back off per object.

pub mod apply;
pub mod build;
pub mod dereference;
pub mod oh_my_opencode;
pub mod status;
pub mod validate;

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ObjectReference, Pod, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use nubabel_contract::signing::{
    MasterKey, MasterKeyTooShort, derive_mcp_token_generation, derive_sidecar_key,
};
use nubabel_crds::v1alpha1::OpencodeSidecar;
use secrecy::ExposeSecret;
use tracing::{Instrument, field};

use self::build::SecretMaterial;
use super::fleet::{self, MANAGED_SELECTOR, instance_of, selector_string};
use super::{Backoff, Capabilities, RESYNC_INTERVAL, Shared, report};
use crate::config::{Config, Labels};
use crate::metrics::ControllerMetrics;

/// The controller's name in metrics.
pub const CONTROLLER_NAME: &str = "opencodesidecar";

/// Operator settings the sidecar children are built from.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image of the `opencode` container when the spec names none.
    pub default_image: String,
    /// Image of the `bridge` container.
    pub bridge_image: String,
    /// The callback API's URL, for the bridge.
    pub callback_url: String,
    /// Labels of the callback API's pods (NetworkPolicy egress).
    pub callback_api_pod_labels: Labels,
    /// Where plugins are installed in the sidecar image.
    pub plugin_dir: String,
    /// Labels selecting the operator's namespace (NetworkPolicy peers).
    pub operator_namespace_labels: Labels,
    /// Labels of the operator's pods (NetworkPolicy ingress).
    pub operator_pod_labels: Labels,
    /// The master key sidecar signing keys are derived from.
    pub master_key: MasterKey,
    /// Whether a fleet's namespace must be bound to its organization.
    pub require_namespace_binding: bool,
}

impl Settings {
    /// Takes the sidecar settings from the operator's configuration.
    pub fn from_config(config: &Config) -> Result<Self, MasterKeyTooShort> {
        Ok(Self {
            default_image: config.sidecar_image.clone(),
            bridge_image: config.bridge_image.clone(),
            callback_url: config.callback_url.clone(),
            callback_api_pod_labels: config.callback_api_pod_labels.clone(),
            plugin_dir: config.plugin_dir.clone(),
            operator_namespace_labels: config.operator_namespace_selector(),
            operator_pod_labels: config.operator_pod_labels.clone(),
            master_key: MasterKey::new(config.signing_master_key.expose_secret().as_bytes())?,
            require_namespace_binding: config.require_namespace_binding,
        })
    }
}

/// What every reconcile of a sidecar gets.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The process's event recorder.
    pub recorder: Recorder,
    /// This controller's metrics.
    pub metrics: ControllerMetrics,
    /// What the API server serves.
    pub capabilities: Capabilities,
    /// Images, URLs and keys the children are built from.
    pub settings: Settings,
    /// Per-object error backoff.
    pub backoff: Backoff,
    /// Shared state, for building the watches.
    shared: Shared,
}

impl Context {
    /// The context of the sidecar controller.
    pub fn new(shared: Shared, settings: Settings) -> Self {
        Self {
            metrics: shared.metrics.controller(CONTROLLER_NAME),
            client: shared.client.clone(),
            recorder: shared.recorder.clone(),
            capabilities: shared.capabilities,
            settings,
            backoff: Backoff::default(),
            shared,
        }
    }
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object does not deserialize (it predates a schema change, or was written around it).
    #[error("the object does not match the OpencodeSidecar schema: {0}")]
    InvalidObject(#[source] Box<InvalidObject>),
    /// Reading the existing children failed.
    #[error(transparent)]
    Dereference(#[from] dereference::Error),
    /// The spec cannot run.
    #[error(transparent)]
    Validate(#[from] validate::Error),
    /// The system's random source failed.
    #[error("failed to generate the OpenCode password")]
    Random(#[source] getrandom::Error),
    /// Applying a child failed.
    #[error(transparent)]
    Apply(#[from] apply::Error),
    /// Listing the fleet's pods failed.
    #[error("failed to list the fleet's pods")]
    ListPods(#[source] kube::Error),
    /// Writing the status failed.
    #[error(transparent)]
    Status(#[from] status::Error),
}

impl Error {
    /// A stable name for metrics and events.
    pub fn category(&self) -> &'static str {
        match self {
            Self::InvalidObject(_) => "InvalidObject",
            Self::Dereference(_) => "Dereference",
            Self::Validate(_) => "InvalidSpec",
            Self::Random(_) => "Random",
            Self::Apply(error) if error.is_rejection() => "ApplyRejected",
            Self::Apply(_) => "Apply",
            Self::ListPods(_) => "ListPods",
            Self::Status(_) => "Status",
        }
    }

    /// The reason shown in the Degraded condition and the Warning event.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Validate(error) => error.reason(),
            other => other.category(),
        }
    }

    /// Whether the object cannot run as it stands: its status says what to change and no
    /// child is touched.
    pub fn is_refusal(&self) -> bool {
        match self {
            Self::InvalidObject(_) | Self::Validate(_) => true,
            Self::Apply(error) => error.is_rejection(),
            _ => false,
        }
    }

    /// Whether only a change to the object can help (so retrying is pointless). A namespace
    /// not bound yet is retried with backoff: the binding lives on the Namespace, which is
    /// not watched.
    pub fn needs_spec_change(&self) -> bool {
        self.is_refusal()
            && !matches!(
                self,
                Self::Validate(validate::Error::NamespaceNotBound { .. })
            )
    }

    /// The message for users: the error and its causes, without Debug noise.
    pub fn message(&self) -> String {
        let mut message = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        message
    }
}

type Guarded = kube::core::DeserializeGuard<OpencodeSidecar>;

/// Reconciles one `OpencodeSidecar`; failures are counted, reported as a Warning event and a
/// Degraded condition, then handed to [`error_policy`].
pub async fn reconcile_sidecar(object: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!(
        "reconcile_sidecar",
        namespace = field::Empty,
        name = field::Empty,
        organization = field::Empty
    );
    span.record("namespace", object.namespace().unwrap_or_default());
    span.record("name", object.name_any());
    if let Ok(sidecar) = &object.0 {
        span.record("organization", sidecar.spec.organization_id.as_str());
    }
    async move {
        let _timer = ctx.metrics.reconcile_started();
        let result = match &object.0 {
            Ok(sidecar) => reconcile(sidecar, &ctx).await,
            Err(invalid) => Err(Error::InvalidObject(Box::new(invalid.clone()))),
        };
        match &result {
            Ok(_) => ctx.backoff.reset(&backoff_key(&object)),
            Err(error) => report_failure(&object, error, &ctx).await,
        }
        result
    }
    .instrument(span)
    .await
}

/// Invalid specs wait for the next change; anything else is retried with per-object
/// exponential backoff.
pub fn error_policy(object: Arc<Guarded>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.needs_spec_change() {
        Action::await_change()
    } else {
        Action::requeue(ctx.backoff.next_delay(&backoff_key(&object)))
    }
}

fn backoff_key(object: &Guarded) -> String {
    object.uid().unwrap_or_else(|| {
        format!(
            "{}/{}",
            object.namespace().unwrap_or_default(),
            object.name_any()
        )
    })
}

async fn reconcile(sidecar: &OpencodeSidecar, ctx: &Context) -> Result<Action, Error> {
    let namespace = sidecar
        .namespace()
        .ok_or(validate::Error::MissingMetadata("namespace"))?;
    let name = sidecar.name_any();
    let client = &ctx.client;

    let namespaces = Api::all(client.clone());
    let observed = dereference::observe(
        ctx.settings
            .require_namespace_binding
            .then_some(&namespaces),
        &namespace,
        &Api::namespaced(client.clone(), &namespace),
        &name,
    )
    .await?;
    let valid = validate::validate(sidecar, &observed, &ctx.settings)?;
    let provisioning = observed.password.is_none();
    let material = SecretMaterial {
        password: match observed.password {
            Some(password) => password,
            None => generate_password().map_err(Error::Random)?,
        },
        callback_key: derive_sidecar_key(&ctx.settings.master_key, &valid.identity).to_whsec(),
        mcp_token: derive_mcp_token_generation(
            &ctx.settings.master_key,
            &valid.identity,
            sidecar.spec.mcp_token_generation.unwrap_or(0),
        )
        .expose()
        .to_owned(),
    };
    let children = build::build(
        &valid,
        &ctx.settings,
        &material,
        ctx.capabilities.pod_disruption_budget_v1,
    );
    let applied = apply::apply(client, &namespace, &children).await?;
    let reference = sidecar.object_ref(&());
    if provisioning {
        publish(
            ctx,
            &reference,
            EventType::Normal,
            "Provisioned",
            format!(
                "created the fleet's children; StatefulSet {name} runs {} pods",
                valid.replicas
            ),
        )
        .await;
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let pods = pods
        .list(&ListParams::default().labels(&selector_string(&name)))
        .await
        .map_err(Error::ListPods)?;
    let next = status::fleet_status(
        sidecar.status.as_ref(),
        &name,
        sidecar.metadata.generation,
        valid.replicas,
        &applied.stateful_set,
        &pods.items,
        status::now(),
    );
    let previous = sidecar
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    for transition in status::transitions(previous, &next.conditions) {
        publish(
            ctx,
            &reference,
            transition.type_,
            transition.reason,
            transition.note,
        )
        .await;
    }
    status::write(&Api::namespaced(client.clone(), &namespace), sidecar, &next).await?;
    Ok(Action::requeue(RESYNC_INTERVAL))
}

/// Counts the failure, publishes a Warning event and, where the object is readable, records
/// the problem in the Degraded condition. Failures to report are logged, not raised.
async fn report_failure(object: &Guarded, error: &Error, ctx: &Context) {
    ctx.metrics.reconcile_failed(error.category());
    let message = error.message();
    if error.is_refusal() {
        tracing::info!(reason = error.reason(), %message, "the spec needs a change");
    } else {
        tracing::warn!(category = error.category(), %message, "reconcile failed");
    }
    publish(
        ctx,
        &object.object_ref(&()),
        EventType::Warning,
        error.reason(),
        message.clone(),
    )
    .await;

    let Ok(sidecar) = &object.0 else {
        return;
    };
    let Some(namespace) = sidecar.namespace() else {
        return;
    };
    let next = if error.is_refusal() {
        let detail = match error {
            Error::Apply(apply_error) => apply_error.api_message().unwrap_or(&message).to_owned(),
            _ => message,
        };
        status::invalid_spec_status(
            sidecar.status.as_ref(),
            &sidecar.name_any(),
            sidecar.metadata.generation,
            error.reason(),
            &detail,
            status::now(),
        )
    } else {
        status::failed_status(
            sidecar.status.as_ref(),
            sidecar.metadata.generation,
            error.reason(),
            &message,
            status::now(),
        )
    };
    if let Err(write_error) = status::write(
        &Api::namespaced(ctx.client.clone(), &namespace),
        sidecar,
        &next,
    )
    .await
    {
        tracing::warn!(error = %write_error, "failed to record the failure in the status");
    }
}

async fn publish(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    report::publish(&ctx.recorder, reference, type_, reason, note).await;
}

/// 32 random bytes, URL-safe base64: the OpenCode server password.
fn generate_password() -> Result<String, getrandom::Error> {
    let mut bytes = [0_u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}

/// Runs the controller until `stop` resolves, then lets running reconciles finish.
pub async fn run(
    ctx: Context,
    concurrency: u16,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let shared = ctx.shared.clone();
    let owned = watcher::Config::default().labels(MANAGED_SELECTOR);
    let pods = watcher::Config::default().labels(&format!(
        "{MANAGED_SELECTOR},app.kubernetes.io/name={}",
        fleet::APP_NAME
    ));
    // NB: our own status writes trigger one more reconcile, which finds nothing to change and
    // writes nothing; filtering on the generation needs kube's unstable stream API.
    let sidecars = shared.watched::<Guarded>();
    let mut controller = Controller::new(sidecars, watcher::Config::default())
        .owns(shared.watched::<StatefulSet>(), owned.clone())
        .owns(shared.watched::<Service>(), owned.clone())
        .owns(shared.watched::<ServiceAccount>(), owned.clone())
        .owns(shared.watched::<NetworkPolicy>(), owned.clone())
        .watches(shared.watched::<Pod>(), pods, |pod| {
            let namespace = pod.namespace()?;
            let name = instance_of(pod.labels())?;
            Some(ObjectRef::<Guarded>::new(name).within(&namespace))
        });
    // Secrets are not watched: that would take list/watch on every Secret in the cluster. A
    // deleted Secret comes back at the next resync.
    if ctx.capabilities.pod_disruption_budget_v1 {
        controller = controller.owns(shared.watched::<PodDisruptionBudget>(), owned);
    }
    let results = controller
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .graceful_shutdown_on(stop)
        .run(reconcile_sidecar, error_policy, Arc::new(ctx));
    report::run_to_end(CONTROLLER_NAME, results).await;
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders for the sidecar controller's unit tests.

    use super::*;
    use crate::controller::sidecar::dereference::Observed;
    use crate::controller::sidecar::validate::ValidSidecar;

    /// Operator settings with recognisable test values.
    pub fn settings() -> Settings {
        Settings {
            default_image: "example.org/opencode:test".to_owned(),
            bridge_image: "example.org/bridge:test".to_owned(),
            callback_url: "http://callback.test:8080".to_owned(),
            callback_api_pod_labels: [("app".to_owned(), "callback-api".to_owned())].into(),
            plugin_dir: "/opt/opencode/plugins".to_owned(),
            operator_namespace_labels: [(
                "kubernetes.io/metadata.name".to_owned(),
                "nubabel-system".to_owned(),
            )]
            .into(),
            operator_pod_labels: [("app".to_owned(), "operator".to_owned())].into(),
            master_key: MasterKey::new(&[7; 32]).unwrap(),
            require_namespace_binding: false,
        }
    }

    /// `team-a/tenant-a` with `spec`.
    pub fn sidecar(spec: serde_json::Value) -> OpencodeSidecar {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "nubabel.io/v1alpha1",
            "kind": "OpencodeSidecar",
            "metadata": {"name": "tenant-a", "namespace": "team-a", "uid": "uid-1", "generation": 1},
            "spec": spec,
        }))
        .unwrap()
    }

    /// `sidecar(spec)`, validated with nothing observed.
    pub fn valid_sidecar(spec: serde_json::Value) -> ValidSidecar {
        validate::validate(&sidecar(spec), &Observed::default(), &settings()).unwrap()
    }

    /// A fixed password and key.
    pub fn material() -> SecretMaterial {
        SecretMaterial {
            password: "opencode-password-1".to_owned(),
            callback_key: "whsec_dGVzdA==".to_owned(),
            mcp_token: "nmcp_dGVzdA".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::truncate;

    #[test]
    fn passwords_are_long_random_and_url_safe() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 43);
        assert_ne!(a, b);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
    }

    #[test]
    fn invalid_specs_wait_for_a_change_and_name_their_reason() {
        let error = Error::Validate(validate::Error::InvalidModel {
            field: "model".to_owned(),
            value: "x".to_owned(),
        });
        assert!(error.needs_spec_change());
        assert_eq!(error.category(), "InvalidSpec");
        assert_eq!(error.reason(), "InvalidModel");
        let transient = Error::ListPods(kube::Error::LinesCodecMaxLineLengthExceeded);
        assert!(!transient.needs_spec_change());
        assert_eq!(transient.category(), "ListPods");
    }

    #[test]
    fn an_unbound_namespace_is_reported_as_a_refusal_but_retried_for_its_binding() {
        let error = Error::Validate(validate::Error::NamespaceNotBound {
            namespace: "team-a".to_owned(),
            organization: "org-a".to_owned(),
        });
        assert!(error.is_refusal());
        assert!(!error.needs_spec_change());
        assert_eq!(error.reason(), "NamespaceNotBound");
    }

    #[test]
    fn long_event_notes_are_cut_at_a_character_boundary() {
        let cut = truncate("é".repeat(600), 1024);
        assert!(cut.len() <= 1024);
        assert!(cut.ends_with("..."));
    }

    mod scenarios {
        //! Reconciles against a mocked API server: the requests, their order and bodies.

        use base64::engine::general_purpose::STANDARD;
        use kube::core::DeserializeGuard;
        use serde_json::json;

        use super::super::test_support::sidecar;
        use super::*;
        use crate::fixtures::{ApiServerVerifier, Exchange, failure, not_found, timeout_after_1s};

        const NS: &str = "/api/v1/namespaces/team-a";

        fn guarded(spec: serde_json::Value) -> Arc<Guarded> {
            Arc::new(DeserializeGuard(Ok(sidecar(spec))))
        }

        fn decoded(secret: &serde_json::Value, key: &str) -> String {
            let text = secret["data"][key].as_str().unwrap();
            String::from_utf8(STANDARD.decode(text).unwrap()).unwrap()
        }

        async fn expect_apply(server: &mut ApiServerVerifier, path: &str) -> Exchange {
            let apply = server.next().await;
            assert_eq!(apply.line(), format!("PATCH {path}"));
            assert!(
                apply.query.contains("fieldManager=nubabel-operator"),
                "{}",
                apply.query
            );
            assert!(apply.query.contains("force=true"), "{}", apply.query);
            assert_eq!(apply.body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
            apply
        }

        /// Answers the children's applies; returns the Secret and StatefulSet bodies.
        async fn answer_children(
            server: &mut ApiServerVerifier,
        ) -> (serde_json::Value, serde_json::Value) {
            expect_apply(server, &format!("{NS}/serviceaccounts/tenant-a-sidecar"))
                .await
                .echo();
            let secret = expect_apply(server, &format!("{NS}/secrets/tenant-a-sidecar")).await;
            let secret_body = secret.body.clone();
            secret.echo();
            expect_apply(server, &format!("{NS}/services/tenant-a"))
                .await
                .echo();
            expect_apply(
                server,
                "/apis/networking.k8s.io/v1/namespaces/team-a/networkpolicies/tenant-a",
            )
            .await
            .echo();
            let sts = expect_apply(
                server,
                "/apis/apps/v1/namespaces/team-a/statefulsets/tenant-a",
            )
            .await;
            let sts_body = sts.body.clone();
            sts.echo();
            (secret_body, sts_body)
        }

        async fn expect_event(server: &mut ApiServerVerifier, type_: &str, reason: &str) -> String {
            let event = server.next().await;
            assert_eq!(
                event.line(),
                "POST /apis/events.k8s.io/v1/namespaces/team-a/events"
            );
            assert_eq!(event.body["type"], type_);
            assert_eq!(event.body["reason"], reason);
            assert_eq!(event.body["regarding"]["name"], "tenant-a");
            let note = event.body["note"].as_str().unwrap_or_default().to_owned();
            let body = event.body.clone();
            event.respond(201, body);
            note
        }

        async fn expect_status(server: &mut ApiServerVerifier) -> serde_json::Value {
            let patch = server.next().await;
            assert_eq!(
                patch.line(),
                "PATCH /apis/nubabel.io/v1alpha1/namespaces/team-a/opencodesidecars/tenant-a/status"
            );
            assert!(patch.query.contains("fieldManager=nubabel-operator"));
            let status = patch.body["status"].clone();
            let mut object =
                serde_json::to_value(sidecar(json!({"organizationId": "o", "model": "a/b"})))
                    .unwrap();
            object["status"] = status.clone();
            patch.respond(200, object);
            status
        }

        fn condition<'a>(status: &'a serde_json::Value, type_: &str) -> &'a serde_json::Value {
            status["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == type_)
                .unwrap()
        }

        #[tokio::test]
        async fn a_new_sidecar_gets_its_children_applied_then_its_status() {
            let (ctx, mut server) = Context::test(Capabilities::default());
            let spec = json!({"organizationId": "org-a", "model": "anthropic/claude-sonnet-4-5"});
            let reconcile = tokio::spawn(reconcile_sidecar(guarded(spec), ctx.clone()));
            timeout_after_1s(async {
                let read = server.next().await;
                assert_eq!(read.line(), format!("GET {NS}/secrets/tenant-a-sidecar"));
                read.respond(404, not_found());

                let (secret, sts) = answer_children(&mut server).await;
                let password = decoded(&secret, fleet::PASSWORD_KEY);
                assert_eq!(password.len(), 43);
                let identity =
                    nubabel_contract::identity::SidecarIdentity::new("org-a", "team-a", "tenant-a")
                        .unwrap();
                assert_eq!(
                    decoded(&secret, fleet::SIGNING_KEY),
                    derive_sidecar_key(&ctx.settings.master_key, &identity).to_whsec()
                );
                // The MCP gateway verifies the same derivation from the identity headers.
                assert_eq!(
                    nubabel_contract::signing::verify_mcp_token(
                        &ctx.settings.master_key,
                        &identity,
                        &decoded(&secret, fleet::MCP_TOKEN_KEY)
                    ),
                    Some(0)
                );
                assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
                // No PodDisruptionBudget on a cluster without policy/v1.
                expect_event(&mut server, "Normal", "Provisioned").await;

                let pods = server.next().await;
                assert_eq!(pods.line(), format!("GET {NS}/pods"));
                assert!(pods.query.contains("labelSelector="));
                pods.respond(
                    200,
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
                );

                expect_event(&mut server, "Normal", "Scaling").await;
                let status = expect_status(&mut server).await;
                assert_eq!(status["observedGeneration"], 1);
                assert_eq!(condition(&status, "Degraded")["status"], "False");
                assert_eq!(condition(&status, "Ready")["reason"], "ReplicasNotReady");
                assert_eq!(
                    status["selector"],
                    "app.kubernetes.io/instance=tenant-a,app.kubernetes.io/name=opencode-sidecar"
                );
            })
            .await;
            let action = reconcile.await.unwrap().unwrap();
            assert_eq!(action, Action::requeue(RESYNC_INTERVAL));
            assert_eq!(ctx.metrics.runs(), 1);
        }

        #[tokio::test]
        async fn an_existing_password_is_kept_and_the_budget_applied_where_served() {
            let (ctx, mut server) = Context::test(Capabilities {
                pod_disruption_budget_v1: true,
            });
            let spec = json!({"organizationId": "org-a", "model": "a/b", "replicas": 0});
            let reconcile = tokio::spawn(reconcile_sidecar(guarded(spec), ctx.clone()));
            timeout_after_1s(async {
                let read = server.next().await;
                read.respond(
                    200,
                    json!({
                        "apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "tenant-a-sidecar", "namespace": "team-a",
                                     "annotations": {fleet::ORGANIZATION_ANNOTATION: "org-a"}},
                        "data": {fleet::PASSWORD_KEY: STANDARD.encode("kept-password")}
                    }),
                );
                let (secret, sts) = answer_children(&mut server).await;
                assert_eq!(decoded(&secret, fleet::PASSWORD_KEY), "kept-password");
                assert_eq!(sts["spec"]["replicas"], 0);
                expect_apply(
                    &mut server,
                    "/apis/policy/v1/namespaces/team-a/poddisruptionbudgets/tenant-a",
                )
                .await
                .echo();
                // Nothing was provisioned, so the next request lists pods.
                let pods = server.next().await;
                assert_eq!(pods.line(), format!("GET {NS}/pods"));
                pods.respond(
                    200,
                    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
                );
                expect_event(&mut server, "Normal", "FleetSuspended").await;
                // The echoed StatefulSet has no status yet: its controller has not seen it.
                expect_event(&mut server, "Normal", "RollingOut").await;
                let status = expect_status(&mut server).await;
                assert_eq!(condition(&status, "Ready")["reason"], "Suspended");
            })
            .await;
            assert!(reconcile.await.unwrap().is_ok());
        }

        #[tokio::test]
        async fn an_invalid_spec_changes_no_child_and_reports_why() {
            let (ctx, mut server) = Context::test(Capabilities::default());
            let spec = json!({
                "organizationId": "org-a", "model": "a/b",
                "resources": {"opencode": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}}}
            });
            let object = guarded(spec);
            let reconcile = tokio::spawn(reconcile_sidecar(object.clone(), ctx.clone()));
            timeout_after_1s(async {
                server.next().await.respond(404, not_found());
                let note = expect_event(&mut server, "Warning", "LimitBelowRequest").await;
                assert!(
                    note.contains("cpu limit 1 is below the request 2"),
                    "{note}"
                );
                let status = expect_status(&mut server).await;
                let degraded = condition(&status, "Degraded");
                assert_eq!(degraded["status"], "True");
                assert_eq!(degraded["reason"], "LimitBelowRequest");
                assert_eq!(condition(&status, "Progressing")["reason"], "InvalidSpec");
            })
            .await;
            // Had it touched a child, it would still wait for an answer and time out above.
            let error = reconcile.await.unwrap().unwrap_err();
            assert_eq!(
                error_policy(object, &error, ctx.clone()),
                Action::await_change()
            );
            assert_eq!(ctx.metrics.failures("InvalidSpec"), 1);
        }

        #[tokio::test]
        async fn a_changed_organization_is_refused_without_touching_children() {
            let (ctx, mut server) = Context::test(Capabilities::default());
            let reconcile = tokio::spawn(reconcile_sidecar(
                guarded(json!({"organizationId": "org-new", "model": "a/b"})),
                ctx.clone(),
            ));
            timeout_after_1s(async {
                server.next().await.respond(
                    200,
                    json!({
                        "apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": "tenant-a-sidecar", "namespace": "team-a",
                                     "annotations": {fleet::ORGANIZATION_ANNOTATION: "org-old"}},
                        "data": {fleet::PASSWORD_KEY: STANDARD.encode("p")}
                    }),
                );
                expect_event(&mut server, "Warning", "OrganizationChanged").await;
                let status = expect_status(&mut server).await;
                assert_eq!(
                    condition(&status, "Degraded")["reason"],
                    "OrganizationChanged"
                );
            })
            .await;
            assert!(matches!(
                reconcile.await.unwrap(),
                Err(Error::Validate(validate::Error::OrganizationChanged { .. }))
            ));
        }

        #[tokio::test]
        async fn an_api_failure_backs_off_per_object_and_is_reported() {
            let (ctx, mut server) = Context::test(Capabilities::default());
            let object = guarded(json!({"organizationId": "org-a", "model": "a/b"}));
            let reconcile = tokio::spawn(reconcile_sidecar(object.clone(), ctx.clone()));
            timeout_after_1s(async {
                server.next().await.respond(404, not_found());
                expect_apply(
                    &mut server,
                    &format!("{NS}/serviceaccounts/tenant-a-sidecar"),
                )
                .await
                .respond(500, failure(500, "etcd is down"));
                let note = expect_event(&mut server, "Warning", "Apply").await;
                assert!(note.contains("ServiceAccount tenant-a-sidecar"), "{note}");
                let status = expect_status(&mut server).await;
                assert_eq!(condition(&status, "Degraded")["reason"], "Apply");
                assert!(status.get("observedGeneration").is_none());
            })
            .await;
            let error = reconcile.await.unwrap().unwrap_err();
            assert_eq!(
                error_policy(object.clone(), &error, ctx.clone()),
                Action::requeue(Backoff::BASE)
            );
            assert_eq!(
                error_policy(object, &error, ctx.clone()),
                Action::requeue(Backoff::BASE * 2)
            );
            assert_eq!(ctx.metrics.failures("Apply"), 1);
        }
    }
}
