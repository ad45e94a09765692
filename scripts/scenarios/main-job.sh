# The main job's scenario: runs in the L1 (or directly on a hardware-KVM host).
# host-agent run: embedded orchestrator + one fresh microVM + the job + teardown.
exec host-agent run "$ASSETS/job.yaml" \
    --secret API_TOKEN=kindling-demo-secret \
    --vmm "$(command -v vmm)" \
    --kernel "$ASSETS/vmlinux" --image "$ASSETS/minimal.erofs" \
    --vcpus 1 --memory-mib 256
