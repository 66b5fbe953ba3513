"""artifacts and checkpoints

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 17:58:29.830537
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "artifacts",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("scope", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("storage_key", sa.String(length=512), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_artifacts_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_artifacts")),
        sa.UniqueConstraint("job_id", "scope", "format", name="uq_artifacts_job_scope_format"),
    )
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_artifacts_job_id"), ["job_id"], unique=False)

    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fine_tuned_model_checkpoint", sa.String(length=300), nullable=False))
        batch_op.create_unique_constraint(
            batch_op.f("uq_checkpoints_fine_tuned_model_checkpoint"), ["fine_tuned_model_checkpoint"]
        )
        batch_op.drop_column("storage_key")

    # Adapters stored before this revision become the final PEFT artifact of their job.
    op.execute(
        "INSERT INTO artifacts (job_id, scope, format, storage_key, sha256, bytes, created_at) "
        "SELECT id, 'final', 'peft', adapter_key, adapter_sha256, 0, COALESCE(finished_at, created_at) "
        "FROM jobs WHERE adapter_key IS NOT NULL"
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("shipped_step", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("peft_unavailable_reason", sa.Text(), nullable=True))
        batch_op.drop_column("adapter_sha256")
        batch_op.drop_column("adapter_key")


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("adapter_key", sa.VARCHAR(length=512), nullable=True))
        batch_op.add_column(sa.Column("adapter_sha256", sa.VARCHAR(length=64), nullable=True))
        batch_op.drop_column("peft_unavailable_reason")
        batch_op.drop_column("shipped_step")

    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("storage_key", sa.VARCHAR(length=512), nullable=False))
        batch_op.drop_constraint(batch_op.f("uq_checkpoints_fine_tuned_model_checkpoint"), type_="unique")
        batch_op.drop_column("fine_tuned_model_checkpoint")

    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_artifacts_job_id"))

    op.drop_table("artifacts")
