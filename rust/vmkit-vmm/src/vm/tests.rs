use super::*;

#[test]
fn state_transitions_follow_cloud_hypervisor() {
    use VmState::*;
    assert!(Created.check_transition(Running).is_ok());
    assert!(Paused.check_transition(Running).is_ok());
    assert!(Shutdown.check_transition(Running).is_ok());
    let err = Running.check_transition(Running).unwrap_err();
    assert_eq!(
        err.message,
        "invalid VM state transition: Running to Running"
    );
    assert!(Shutdown.check_transition(Paused).is_err());
    assert!(Created.check_transition(Created).is_err());
}
