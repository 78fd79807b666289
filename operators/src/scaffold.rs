//! The one scaffold of arenaflow's operators, built from DataFusion's own parts: an
//! [`Operator`] says what it does to its input's record batches; [`OperatorExec`] is the
//! physical plan node around it (cached `PlanProperties`, an `ExecutionPlanMetricsSet`
//! that `EXPLAIN ANALYZE` shows and the runner reads, `required_input_distribution` for
//! operators that need all rows in one stream); [`OperatorTable`] is what its SQL table
//! function returns: a view over the input table whose scan wraps the input's plan.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{internal_err, plan_err, Result};
use datafusion::datasource::TableType;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{
    Distribution, EquivalenceProperties, LexRequirement, OrderingRequirements, Partitioning,
    PhysicalExpr, PhysicalSortRequirement,
};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::expressions::Column;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};

/// What one operator does to the record batches of its one input.
pub trait Operator: fmt::Debug + Send + Sync + 'static {
    /// The plan node's name, e.g. `TokenizeExec`.
    const NAME: &'static str;

    /// The output schema for an input schema (errors here are plan errors: a missing or
    /// mistyped column).
    fn output_schema(&self, input: &Schema) -> Result<SchemaRef>;

    /// Whether the operator needs every input row in one stream (one output partition);
    /// otherwise it runs on each input partition as it comes.
    fn single_partition(&self) -> bool;

    /// Columns the input must arrive sorted by (ascending, nulls last), so that what the
    /// operator does is a function of the rows alone and not of the order in which input
    /// partitions happen to arrive. Empty: any order.
    fn input_order(&self) -> &'static [&'static str] {
        &[]
    }

    /// The output stream of one partition over `run.input`.
    fn execute(&self, run: OperatorRun) -> Result<SendableRecordBatchStream>;
}

/// What one execution of an operator gets.
pub struct OperatorRun {
    pub input: SendableRecordBatchStream,
    /// The input's plan (to key what a run commits).
    pub input_plan: Arc<dyn ExecutionPlan>,
    pub partition: usize,
    pub context: Arc<TaskContext>,
    pub metrics: ExecutionPlanMetricsSet,
    pub schema: SchemaRef,
}

/// The physical plan node of an [`Operator`] over one child.
#[derive(Debug)]
pub struct OperatorExec<Op: Operator> {
    op: Arc<Op>,
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl<Op: Operator> OperatorExec<Op> {
    pub fn try_new(op: Arc<Op>, input: Arc<dyn ExecutionPlan>) -> Result<Self> {
        let schema = op.output_schema(&input.schema())?;
        let partitioning = if op.single_partition() {
            Partitioning::UnknownPartitioning(1)
        } else {
            input.properties().output_partitioning().clone()
        };
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            partitioning,
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            op,
            input,
            schema,
            properties,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    pub fn operator(&self) -> &Op {
        &self.op
    }

    /// The metrics of every execution of this node so far.
    pub fn metrics_set(&self) -> MetricsSet {
        self.metrics.clone_inner()
    }
}

impl<Op: Operator> DisplayAs for OperatorExec<Op> {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}: {:?}", Op::NAME, self.op)
    }
}

impl<Op: Operator> ExecutionPlan for OperatorExec<Op> {
    fn name(&self) -> &str {
        Op::NAME
    }
    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }
    fn required_input_distribution(&self) -> Vec<Distribution> {
        if self.op.single_partition() {
            vec![Distribution::SinglePartition]
        } else {
            vec![Distribution::UnspecifiedDistribution]
        }
    }
    fn required_input_ordering(&self) -> Vec<Option<OrderingRequirements>> {
        let schema = self.input.schema();
        let columns = self
            .op
            .input_order()
            .iter()
            .map(|name| {
                let index = schema.index_of(name).ok()?;
                let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new(name, index));
                Some(PhysicalSortRequirement::new(
                    column,
                    Some(SortOptions {
                        descending: false,
                        nulls_first: false,
                    }),
                ))
            })
            .collect::<Option<Vec<_>>>();
        vec![columns
            .and_then(LexRequirement::new)
            .map(OrderingRequirements::new)]
    }
    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![!self.op.single_partition()]
    }
    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }
    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }
    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.as_slice() {
            [child] => Ok(Arc::new(Self::try_new(self.op.clone(), child.clone())?)),
            _ => plan_err!("{} takes one child", Op::NAME),
        }
    }
    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let partitions = self
            .input
            .properties()
            .output_partitioning()
            .partition_count();
        if self.op.single_partition() && partitions != 1 {
            return internal_err!(
                "{} needs one input partition, got {partitions} (the plan was not optimized)",
                Op::NAME
            );
        }
        self.op.execute(OperatorRun {
            input: self.input.execute(partition, context.clone())?,
            input_plan: self.input.clone(),
            partition,
            context,
            metrics: self.metrics.clone(),
            schema: self.schema.clone(),
        })
    }
}

/// Every node of type `OperatorExec<Op>` in a plan tree, in depth-first order.
pub fn find_operators<Op: Operator>(plan: &Arc<dyn ExecutionPlan>) -> Vec<&OperatorExec<Op>> {
    let mut found = Vec::new();
    let mut stack = vec![plan];
    while let Some(node) = stack.pop() {
        if let Some(exec) = node.downcast_ref::<OperatorExec<Op>>() {
            found.push(exec);
        }
        stack.extend(node.children().into_iter().rev());
    }
    found
}

/// What an operator's table function returns: a view over `input` that runs the operator
/// on the input's scan.
#[derive(Debug)]
pub struct OperatorTable<Op: Operator> {
    op: Arc<Op>,
    input: Arc<dyn TableProvider>,
    schema: SchemaRef,
}

impl<Op: Operator> OperatorTable<Op> {
    pub fn try_new(op: Op, input: Arc<dyn TableProvider>) -> Result<Self> {
        let schema = op.output_schema(&input.schema())?;
        Ok(Self {
            op: Arc::new(op),
            input,
            schema,
        })
    }
}

#[async_trait]
impl<Op: Operator> TableProvider for OperatorTable<Op> {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn table_type(&self) -> TableType {
        TableType::View
    }
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let input = self.input.scan(state, None, &[], None).await?;
        let exec: Arc<dyn ExecutionPlan> = Arc::new(OperatorExec::try_new(self.op.clone(), input)?);
        let Some(columns) = projection else {
            return Ok(exec);
        };
        let exprs = columns
            .iter()
            .map(|&i| {
                let name = self.schema.field(i).name().clone();
                let column: Arc<dyn PhysicalExpr> = Arc::new(Column::new(&name, i));
                (column, name)
            })
            .collect::<Vec<_>>();
        Ok(Arc::new(ProjectionExec::try_new(exprs, exec)?))
    }
}
